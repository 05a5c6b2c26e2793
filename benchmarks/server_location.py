"""Where the parameter server lives: in the driver process (classic Spark's default) against
inside the cluster (a process on an executor, started and asked through one-task jobs: Spark
Connect's home, and classic Spark's with ``spark.keras.ps.location=cluster``).

    .venv/bin/python -m benchmarks.server_location [--quick]

The same fits, 2 workers on local[2], with the server in each place, taken in turns (driver,
cluster, driver, cluster) so that a drift of the machine falls on both; each fit's throughput and
holdout accuracy, and single-process Keras's as the reference of both. The in-cluster server
adds a job to start it and one to collect the result, and its process imports Keras and builds
the model while the first does: the fixed cost is the whole-fit time a fit on the driver does
not pay, measured on digits (whose fits are short). ``--quick``: fifth-size dense.
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks import workloads
from benchmarks.common import Report, log, section_main, spark_session
from benchmarks.configurations import CONFIGURATIONS, DEFAULT
from benchmarks.training import our_fit, reference_fit

#: The default, the exchange-heaviest sync schedule, and an asynchronous one.
CHOSEN = [DEFAULT] + [
    c for c in CONFIGURATIONS if c.name.startswith(("sync/batch", "async/steps", "hogwild/batch"))
]
LOCATIONS = ("driver", "cluster")
TURNS = 2


def run(report: Report, quick: bool) -> None:
    from spark_keras_ml.server_location import LOCATION_CONF

    spark = spark_session()
    chosen = [workloads.dense(0.2 if quick else 1.0), workloads.digits()]
    for w in chosen:
        train = w.train_frame(spark)
        reference = reference_fit(w, 0.2 if quick and w.name == "dense" else 1.0, runs=2)
        our_fit(w, train, DEFAULT)  # warm: the Python workers import TensorFlow once
        for configuration in CHOSEN:
            fits: dict[str, list[dict[str, Any]]] = {place: [] for place in LOCATIONS}
            for _ in range(TURNS):
                for place in LOCATIONS:
                    spark.conf.set(LOCATION_CONF, place)
                    fits[place].append(our_fit(w, train, configuration))
            spark.conf.unset(LOCATION_CONF)
            summary = {
                place: {
                    "samples_per_s": statistics.median(f["samples_per_s"] for f in runs),
                    "seconds": statistics.median(f["seconds"] for f in runs),
                    "accuracy": statistics.mean(f["accuracy"] for f in runs),
                }
                for place, runs in fits.items()
            }
            driver, cluster = summary["driver"], summary["cluster"]
            report.series(
                "server_location",
                {
                    "workload": w.name,
                    "configuration": configuration.name,
                    "reference_samples_per_s": reference["samples_per_s"],
                    "reference_accuracy": reference["accuracy"],
                    **{f"{place}_{k}": v for place, s in summary.items() for k, v in s.items()},
                    "fits": fits,
                },
            )
            log(
                f"{w.name} {configuration.name}: driver {driver['samples_per_s']:,.0f} samples/s "
                f"({driver['seconds']:.1f} s, accuracy {driver['accuracy']:.4f}); cluster "
                f"{cluster['samples_per_s']:,.0f} samples/s ({cluster['seconds']:.1f} s, "
                f"accuracy {cluster['accuracy']:.4f}); single-process "
                f"{reference['samples_per_s']:,.0f} samples/s"
            )
            for place, s in summary.items():
                report.add(
                    "server_location",
                    f"{w.name} {configuration.name}, server {'in the ' + place}, samples/s",
                    ours=s["samples_per_s"],
                    unit="samples/s",
                    reference=reference["samples_per_s"],
                    reference_name="single-process model.fit",
                )
            report.add(
                "server_location",
                f"{w.name} {configuration.name}: whole fit with the server in the cluster",
                ours=cluster["seconds"],
                unit="s",
                reference=driver["seconds"],
                reference_name="the same fit, server on the driver",
                target=1.1 if w.name == "dense" else None,
                ceiling=True,
                target_note="at most 1.1x the driver's" if w.name == "dense" else "",
            )


def main() -> None:
    section_main("server_location", run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
