"""Learning quality: holdout accuracy of every configuration (benchmarks/configurations.py,
the default first) at 2, 4 and 8 workers, against single-process Keras with the same epochs,
batch size and learning rate, on dense, digits, wide and conv.

    .venv/bin/python -m benchmarks.quality [--quick]
    .venv/bin/python -m benchmarks.quality --workloads conv --configurations async/batch \
        --workers 4 8

Runs on local[8] (eight task slots on this machine's cores: a sync fit needs a slot per worker
at once). ``--quick``: digits and conv, four configurations, 2 and 8 workers. ``--workloads``,
``--configurations`` (names starting with these) and ``--workers`` run part of the loop, to
check a change: logged only, the section's results are left as they are.

Digits has 360 holdout rows and conv 1,000, so one run's accuracy has a binomial spread of
about 1.2 points: as wide as the targets. On those every configuration, and the reference, is
therefore fitted with several seeds (initial weights and shuffles), and their means are
compared, each seed's fit against the reference with the same initial weights. Dense (20,000
holdout rows) and wide (2,000) are fitted once.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks import workloads
from benchmarks.common import Report, log, section_main, setup_logging, spark_session
from benchmarks.configurations import CONFIGURATIONS, Configuration, quality_window
from benchmarks.training import reference_fit
from benchmarks.workloads import Workload

SEEDED = ("digits", "conv")
SEEDS = 3
QUICK = [c for c in CONFIGURATIONS if c.name.split(" ")[0] in ("default", "sync/batch")] + [
    c for c in CONFIGURATIONS if c.name in ("async/epoch", "hogwild/epoch")
]


def accuracy_of(
    w: Workload, train: Any, configuration: Configuration, workers: int, seed: int
) -> float:
    from spark_keras_ml import KerasEstimator

    est = KerasEstimator(
        model=w.model(seed=seed),
        epochs=w.epochs,
        batchSize=w.batch_size,
        numWorkers=workers,
        seed=seed,
        **configuration.params,
    )
    model = est.fit(train).getKerasModel()
    _, accuracy = model.evaluate(w.x_test, w.y_test, batch_size=1024, verbose=0)
    return float(accuracy)


WORKLOADS = ("dense", "digits", "wide", "conv")


@dataclass(frozen=True)
class Part:
    """Part of the loop (None: all of it)."""

    workloads: Sequence[str] | None = None
    #: Configurations whose names start with one of these.
    configurations: Sequence[str] | None = None
    workers: Sequence[int] | None = None


def run(report: Report, quick: bool, part: Part = Part()) -> None:
    counts: tuple[int, ...]
    if quick:
        names, configurations, counts = ["digits", "conv"], QUICK, (2, 8)
    else:
        names, configurations, counts = list(WORKLOADS), CONFIGURATIONS, (2, 4, 8)
    names = [n for n in names if part.workloads is None or n in part.workloads]
    if part.configurations is not None:
        prefixes = tuple(part.configurations)
        configurations = [c for c in configurations if c.name.startswith(prefixes)]
    counts = tuple(part.workers or counts)
    for w in (workloads.make(n) for n in names):
        # A session (and so Python workers) per workload: a worker Spark reuses grows with
        # every fit by what Keras itself keeps of a model (about 22 MB a fit of wide), and
        # eight of them outgrew this machine's memory over a few hundred fits.
        spark = spark_session("local[8]")
        seeds = list(range(SEEDS if w.name in SEEDED and not quick else 1))
        train = w.train_frame(spark)
        references = [reference_fit(w, seed=seed)["accuracy"] for seed in seeds]
        reference = statistics.mean(references)
        log(f"{w.name}: single-process accuracy {reference:.4f} over seeds {references}")
        for configuration in configurations:
            points = quality_window(configuration)
            for workers in counts:
                runs = [accuracy_of(w, train, configuration, workers, seed) for seed in seeds]
                ours = statistics.mean(runs)
                log(
                    f"{w.name} {configuration.name} x{workers}: accuracy {ours:.4f} "
                    f"({ours - reference:+.4f}) over seeds {runs}"
                )
                report.series(
                    "quality",
                    {
                        "workload": w.name,
                        "configuration": configuration.name,
                        "params": configuration.params,
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
                    f"{w.name} {configuration.name} holdout accuracy, {workers} workers",
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS)
    parser.add_argument("--configurations", nargs="+", metavar="NAME_START")
    parser.add_argument("--workers", nargs="+", type=int)
    args = parser.parse_args()
    part = Part(args.workloads, args.configurations, args.workers)
    if part == Part():
        section_main("quality", run, __doc__.splitlines()[0])
        return
    setup_logging()
    run(Report("quality", quick=args.quick), args.quick, part)  # logged, not written


if __name__ == "__main__":
    main()
