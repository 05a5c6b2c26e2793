"""What every benchmark shares: the report (JSON, Markdown table, PNG chart), a local SparkSession,
and a sampler of the process tree's memory.

Every figure that has a reference is measured against it in the same run and reported as a
ratio; targets are ratios (or, for wall time and memory, limits).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("benchmarks")


def log(message: str) -> None:
    logger.info(message)


@dataclass
class Result:
    section: str
    name: str
    value: float
    unit: str
    reference: float | None = None
    reference_name: str = ""
    #: The ratio (value / reference) to reach, or the limit the value must stay within.
    target: float | None = None
    #: True when the target is a limit on the value (seconds, bytes), not a ratio.
    limit: bool = False
    #: How the target reads in the table, when the ratio alone says it badly.
    target_note: str = ""
    #: True when the ratio must stay at or below the target (a wall time against the
    #: reference's), not reach it.
    ceiling: bool = False

    @property
    def ratio(self) -> float | None:
        if self.reference in (None, 0):
            return None
        return self.value / self.reference  # type: ignore[operator]

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        if self.limit:
            return self.value <= self.target
        if self.ceiling:
            return self.ratio is not None and self.ratio <= self.target
        return self.ratio is not None and self.ratio >= self.target

    def target_text(self) -> str:
        if self.target is None:
            return ""
        if self.target_note:
            return self.target_note
        return f"<= {self.target:g} {self.unit}" if self.limit else f">= {self.target:g}x"


@dataclass
class Report:
    name: str
    quick: bool = False
    results: list[Result] = field(default_factory=list)
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def add(
        self,
        section: str,
        name: str,
        *,
        ours: float,
        unit: str,
        reference: float | None = None,
        reference_name: str = "",
        target: float | None = None,
        limit: bool = False,
        target_note: str = "",
        ceiling: bool = False,
    ) -> Result:
        result = Result(
            section,
            name,
            ours,
            unit,
            reference,
            reference_name,
            target,
            limit,
            target_note,
            ceiling,
        )
        self.results.append(result)
        return result

    def series(self, name: str, row: dict[str, Any]) -> None:
        self.rows.setdefault(name, []).append(row)

    def series_rows(self, name: str) -> list[dict[str, Any]]:
        return self.rows.get(name, [])

    def markdown(self) -> str:
        lines = [
            "| section | measurement | ours | reference | ratio | target | met |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.results:
            reference = f"{r.reference:,.1f} {r.unit} ({r.reference_name})" if r.reference else ""
            ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
            met = {True: "yes", False: "**no**", None: ""}[r.met]
            lines.append(
                f"| {r.section} | {r.name} | {r.value:,.1f} {r.unit} | {reference} | {ratio} "
                f"| {r.target_text()} | {met} |"
            )
        return "\n".join(lines) + "\n"

    def write(self, folder: Path = RESULTS) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder / (self.name + ("-quick" if self.quick else ""))
        payload = {
            "name": self.name,
            "quick": self.quick,
            "machine": machine(),
            "seconds": time.time() - self.started,
            "results": [{**asdict(r), "ratio": r.ratio, "met": r.met} for r in self.results],
            "series": self.rows,
        }
        stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
        stem.with_suffix(".md").write_text(self.markdown())
        self.chart(stem.with_suffix(".png"))
        log(f"wrote {stem}.json, .md and .png")
        return stem

    def chart(self, path: Path) -> None:
        """Ratios against their targets, one bar per measurement that has a reference."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rated = [r for r in self.results if r.ratio is not None]
        if not rated:
            return
        figure, ax = plt.subplots(figsize=(11, 0.45 * len(rated) + 1.5))
        names = [f"{r.section}: {r.name}" for r in rated]
        colors = [
            "tab:green" if r.met else "tab:red" if r.met is False else "tab:gray" for r in rated
        ]
        ax.barh(names, [r.ratio for r in rated], color=colors)
        for i, r in enumerate(rated):
            if r.target is not None and not r.limit:  # a ceiling too: its tick is its bound
                ax.plot([r.target, r.target], [i - 0.4, i + 0.4], color="black")
        ax.axvline(1.0, color="gray", linestyle=":")
        ax.set_xlabel("ratio to the reference measured in the same run; black tick: target")
        ax.invert_yaxis()
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)


def machine() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def spark_session(master: str = "local[2]") -> Any:
    """The demo's embedded session (workers on this interpreter, no UI), logging errors only."""
    from spark_keras_ml.demo import start_spark

    spark = start_spark(master, app_name="spark_keras_ml benchmarks")
    spark.sparkContext.setLogLevel("ERROR")
    return spark


class TreeMemory:
    """Samples the memory of this process and all its descendants (JVM, Python workers) every
    ``interval`` seconds, and keeps the largest sums seen.

    ``peak`` is the proportional set size (PSS): a page shared by k processes counts 1/k in
    each, so the sum is the memory the tree really holds. ``peak_rss`` sums resident sets, which
    counts TensorFlow's shared-library pages (about 380 MB) once per Python process that loaded
    it. ``peak_by_process`` is the (pid, command, rss, pss) of every process at the PSS peak.
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak = 0
        self.peak_rss = 0
        self.peak_by_process: list[tuple[int, str, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-memory", daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def breakdown(self) -> list[dict[str, Any]]:
        """Every process at the PSS peak, as JSON-ready rows."""
        return [
            {"pid": pid, "command": command, "rss": rss, "pss": pss}
            for pid, command, rss, pss in self.peak_by_process
        ]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            processes = tree_memory(os.getpid())
            self.peak_rss = max(self.peak_rss, sum(p[2] for p in processes))
            pss = sum(p[3] for p in processes)
            if pss > self.peak:
                self.peak, self.peak_by_process = pss, processes


def tree_memory(root: int) -> list[tuple[int, str, int, int]]:
    """(pid, command, rss bytes, pss bytes) of ``root`` and its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                sizes = {
                    line.split(":")[0]: int(line.split()[1]) * 1024
                    for line in f
                    if line.startswith(("Rss:", "Pss:"))
                }
            with open(f"/proc/{pid}/cmdline") as f:
                command = f.read().replace("\0", " ").strip()[:100]
        except (OSError, IndexError, ValueError):
            continue
        out.append((pid, command, sizes.get("Rss", 0), sizes.get("Pss", 0)))
    return out


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    logging.getLogger("spark_keras_ml").setLevel(logging.WARNING)


def section_main(name: str, run: Callable[[Report, bool], None], description: str) -> None:
    """The command line of one benchmark section: ``python -m benchmarks.<name> [--quick]``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    setup_logging()
    report = Report(name, quick=args.quick)
    run(report, args.quick)
    report.write()
