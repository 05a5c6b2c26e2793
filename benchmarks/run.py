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

SECTIONS = [
    "parameter_server",
    "inference",
    "training",
    "backends",
    "server_location",
    "quality",
    "scaling",
]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sections", nargs="*", default=SECTIONS, choices=SECTIONS)
    parser.add_argument(
        "--docs-only",
        action="store_true",
        help="rewrite docs/benchmarks.md from the last run's results, without running anything "
        "(a section that run did not have is taken from its own last results, and named so)",
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
        separate = {}
        for section in SECTIONS:
            own = RESULTS / f"{section}{suffix}.json"
            if _has_section(combined, section) or not own.exists():
                continue
            section_data = json.loads(own.read_text())
            _merge(combined, section_data)
            separate[section] = float(section_data["seconds"])
        write_docs(combined, RESULTS / f"bench{suffix}", data["seconds"], args.quick, separate)
        return
    for section in args.sections:
        log(f"=== {section}")
        command = [sys.executable, "-m", f"benchmarks.{section}"] + (
            ["--quick"] if args.quick else []
        )
        subprocess.run(command, check=True)
        _merge(combined, json.loads((RESULTS / f"{section}{suffix}.json").read_text()))
    stem = combined.write()
    write_docs(combined, stem, time.time() - started, args.quick)


def _result(row: dict[str, Any]) -> Result:
    return Result(**{k: row[k] for k in Result.__dataclass_fields__ if k in row})


def _merge(combined: Report, data: dict[str, Any]) -> None:
    """Add one section's results and series (its JSON) to the combined report."""
    combined.results.extend(_result(r) for r in data["results"])
    for name, rows in data["series"].items():
        combined.rows.setdefault(name, []).extend(rows)


def _has_section(report: Report, section: str) -> bool:
    return section in report.rows or any(r.section == section for r in report.results)


def write_docs(
    report: Report,
    stem: Path,
    seconds: float,
    quick: bool,
    separate: dict[str, float] | None = None,
) -> None:
    """docs/benchmarks.md's results block; ``separate`` names the sections (and their minutes)
    that were run on their own after the run ``stem`` records."""
    command = "make bench-quick" if quick else "make bench"
    flag = " --quick" if quick else ""
    own = [
        f"`python -m benchmarks.{name}{flag}` ({took / 60:.1f} minutes)"
        for name, took in (separate or {}).items()
    ]
    chart = Path("..") / stem.relative_to(DOCS.parents[1]).with_suffix(".png")
    info = machine()
    missed = [r for r in report.results if r.met is False]
    lines = [
        f"Produced by `{command}` in {seconds / 60:.1f} minutes on {info['cpus']} CPUs, "
        f"{info['memory_gib']} GiB (Python {info['python']}, {info['platform']})."
        + (" This is the quick variant: smaller data, fewer modes." if quick else "")
        + (
            " Run on its own afterwards, on the same machine, and added to the table: "
            + ", ".join(own)
            + "."
            if own
            else ""
        ),
        "",
        report.markdown(),
        *points_table(report.series_rows("quality")),
        f"![ratios against their references]({chart.as_posix()})",
        "",
        *scaling_part(report, quick),
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


def scaling_part(report: Report, quick: bool) -> list[str]:
    """The scaling section's figures, a line per fit, its limited run and its chart."""
    from benchmarks.scaling import figures_table, limited_lines

    rows = report.series_rows("scaling")
    if not rows:
        return []
    chart = Path("..") / (RESULTS / f"scaling{'-quick' if quick else ''}.png").relative_to(
        DOCS.parents[1]
    )
    return [
        "Scaling with the table's size (`benchmarks/scaling.py`): every fit, each worker's cache, "
        "its peak above its baseline (Python, TensorFlow, Keras and the model loaded, before a "
        "row is read) "
        "and that over its partition's float32 size; samples/s over the slowest worker's "
        "training time, and over the whole fit (rows generated and shuffled included):",
        "",
        *figures_table(rows),
        "",
        *limited_lines(report.series_rows("scaling_cgroup")),
        f"![samples/s and worker peak against rows]({chart.as_posix()})",
        "",
    ]


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
