"""Run every benchmark and write the combined table, chart and docs/benchmarks.md.

    make bench         # .venv/bin/python -m benchmarks.run
    make bench-quick   # .venv/bin/python -m benchmarks.run --quick  (about 10 minutes)

Each section runs in its own Python process (its own SparkSession and JVM, so no section's
memory or warm caches leak into the next), writes benchmarks/results/<section>[-quick].json,
and this script merges them into benchmarks/results/bench[-quick].{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, Report, Result, log, machine, setup_logging

SECTIONS = ["parameter_server", "inference", "training", "quality"]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sections", nargs="*", default=SECTIONS, choices=SECTIONS)
    parser.add_argument(
        "--docs-only",
        action="store_true",
        help="rewrite docs/benchmarks.md from the last run's results, without running anything",
    )
    args = parser.parse_args()
    setup_logging()
    started = time.time()
    suffix = "-quick" if args.quick else ""
    combined = Report("bench", quick=args.quick)
    if args.docs_only:
        data = json.loads((RESULTS / f"bench{suffix}.json").read_text())
        combined.results = [_result(r) for r in data["results"]]
        combined.rows = data["series"]
        write_docs(combined, RESULTS / f"bench{suffix}", data["seconds"], args.quick)
        return
    for section in args.sections:
        log(f"=== {section}")
        command = [sys.executable, "-m", f"benchmarks.{section}"] + (
            ["--quick"] if args.quick else []
        )
        subprocess.run(command, check=True)
        data = json.loads((RESULTS / f"{section}{suffix}.json").read_text())
        combined.results.extend(_result(r) for r in data["results"])
        for name, rows in data["series"].items():
            combined.rows.setdefault(name, []).extend(rows)
    stem = combined.write()
    write_docs(combined, stem, time.time() - started, args.quick)


def _result(row: dict[str, Any]) -> Result:
    return Result(**{k: row[k] for k in Result.__dataclass_fields__ if k in row})


def write_docs(report: Report, stem: Path, seconds: float, quick: bool) -> None:
    command = "make bench-quick" if quick else "make bench"
    chart = Path("..") / stem.relative_to(DOCS.parents[1]).with_suffix(".png")
    info = machine()
    missed = [r for r in report.results if r.met is False]
    lines = [
        f"Produced by `{command}` in {seconds / 60:.1f} minutes on {info['cpus']} CPUs, "
        f"{info['memory_gib']} GiB (Python {info['python']}, {info['platform']})."
        + (" This is the quick variant: smaller data, fewer modes." if quick else ""),
        "",
        report.markdown(),
        *points_table(report.series_rows("quality")),
        f"![ratios against their references]({chart.as_posix()})",
        "",
        f"Rows that meet their target: {sum(r.met is True for r in report.results)} of "
        f"{sum(r.met is not None for r in report.results)} (every quality configuration is a "
        "row of its own).",
    ]
    if missed:
        lines += ["", "Missed: " + "; ".join(f"{r.section} {r.name}" for r in missed) + "."]
    DOCS.write_text(with_results(DOCS.read_text() if DOCS.exists() else "", "\n".join(lines)))
    log(f"wrote {DOCS}")


def points_table(rows: list[dict[str, Any]]) -> list[str]:
    """The quality rows as holdout points against single-process Keras, one line per
    configuration and a column per workload, "a / b / c" at the worker counts measured."""
    if not rows:
        return []
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    configurations = list(dict.fromkeys(r.get("configuration", r.get("mode")) for r in rows))
    counts = sorted({r["workers"] for r in rows})
    points = {
        (r.get("configuration", r.get("mode")), r["workload"], r["workers"]): 100
        * (r["accuracy"] - r["reference"])
        for r in rows
    }

    def cell(configuration: str, workload: str) -> str:
        values = [points.get((configuration, workload, n)) for n in counts]
        return " / ".join("–" if v is None else f"{v:+.1f}" for v in values)

    workers = " / ".join(str(n) for n in counts)
    lines = [
        "",
        f"Holdout accuracy in points against single-process Keras, at {workers} workers:",
        "",
        "| configuration | " + " | ".join(workloads) + " |",
        "|---" * (len(workloads) + 1) + "|",
    ]
    lines += [
        f"| {c} | " + " | ".join(cell(c, w) for w in workloads) + " |" for c in configurations
    ]
    return [*lines, ""]


#: docs/benchmarks.md is written by hand around these markers; a run replaces what is between.
START, END = "<!-- results: start -->", "<!-- results: end -->"


def with_results(document: str, results: str) -> str:
    """``document`` with its generated section replaced by ``results`` (or made of it alone)."""
    block = f"{START}\n{results}\n{END}"
    if START in document and END in document:
        head, rest = document.split(START, 1)
        return head + block + rest.split(END, 1)[1]
    return block + "\n"


if __name__ == "__main__":
    main()
