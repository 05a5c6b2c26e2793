"""Training throughput on each Keras backend, against single-process Keras on the same backend.

    .venv/bin/python -m benchmarks.backends [--quick]

Keras picks its backend once per process, at import, so each backend runs in a process of its
own (this module again, with ``KERAS_BACKEND`` set and ``--backend``), with its own SparkSession
on local[2]: 2 workers, the default schedule first, then the exchange-heaviest sync schedule
and an asynchronous one; the reference is ``model.fit`` in one process on the same backend, in
the same run. Each fit's holdout accuracy is reported beside its throughput. ``--quick``:
digits only, one fit per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

from benchmarks import workloads
from benchmarks.common import Report, log, setup_logging, spark_session
from benchmarks.configurations import CONFIGURATIONS, DEFAULT
from benchmarks.training import our_fit, reference_fit

BACKENDS = ("tensorflow", "jax", "torch")
#: The default, exact synchronous SGD (the server steps the optimizer: backend code on both
#: sides), and an asynchronous schedule.
CHOSEN = [DEFAULT] + [
    c for c in CONFIGURATIONS if c.name.startswith(("sync/batch", "async/steps", "hogwild/batch"))
]
#: What a child process prints before its JSON line.
MARK = "BACKEND-RESULT "


def measure(quick: bool) -> dict[str, Any]:
    """This process's backend: each workload's reference and every chosen configuration."""
    import keras

    spark = spark_session()
    chosen = [workloads.digits()] if quick else [workloads.digits(), workloads.dense(0.2)]
    scale = {"digits": 1.0, "dense": 0.2}
    rows = []
    for w in chosen:
        train = w.train_frame(spark)
        reference = reference_fit(w, scale[w.name], runs=2)
        our_fit(w, train, DEFAULT)  # warm: the Python workers import the backend once
        for configuration in CHOSEN:
            fits = [our_fit(w, train, configuration) for _ in range(1 if quick else 2)]
            rows.append(
                {
                    "workload": w.name,
                    "configuration": configuration.name,
                    "samples_per_s": statistics.median(f["samples_per_s"] for f in fits),
                    "accuracy": statistics.mean(f["accuracy"] for f in fits),
                    "reference_samples_per_s": reference["samples_per_s"],
                    "reference_accuracy": reference["accuracy"],
                }
            )
    spark.stop()
    return {"backend": keras.backend.backend(), "rows": rows}


def run(report: Report, quick: bool) -> None:
    for backend in BACKENDS:
        log(f"--- backend {backend}")
        # A Python with every backend installed (make bench names .venv-backends' own).
        python = os.environ.get("SKML_BACKENDS_PYTHON", sys.executable)
        command = [python, "-m", "benchmarks.backends", "--backend", backend]
        done = subprocess.run(
            command + (["--quick"] if quick else []),
            env=dict(os.environ, KERAS_BACKEND=backend),
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        line = next(x for x in done.stdout.splitlines() if x.startswith(MARK))
        measured = json.loads(line[len(MARK) :])
        for row in measured["rows"]:
            report.series("backends", {"backend": backend, **row})
            name = f"{backend}: {row['workload']} {row['configuration']}"
            log(
                f"{name}: {row['samples_per_s']:,.0f} samples/s (accuracy {row['accuracy']:.4f}); "
                f"single-process {row['reference_samples_per_s']:,.0f} samples/s "
                f"(accuracy {row['reference_accuracy']:.4f})"
            )
            report.add(
                "backends",
                f"{name}, samples/s",
                ours=row["samples_per_s"],
                unit="samples/s",
                reference=row["reference_samples_per_s"],
                reference_name=f"single-process model.fit on {backend}",
            )
            report.add(
                "backends",
                f"{name}, holdout accuracy",
                ours=100 * row["accuracy"],
                unit="%",
                reference=100 * row["reference_accuracy"],
                reference_name=f"single-process model.fit on {backend}",
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backend", choices=BACKENDS, help="measure this process's backend")
    args = parser.parse_args()
    setup_logging()
    if args.backend:
        sys.stdout.write(MARK + json.dumps(measure(args.quick)) + "\n")
        return
    report = Report("backends", quick=args.quick)
    run(report, args.quick)
    report.write()


if __name__ == "__main__":
    main()
