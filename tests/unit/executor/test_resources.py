"""What a worker reports of its own memory: no SparkSession, real processes."""

from __future__ import annotations

import json
import subprocess
import sys

from spark_keras_ml.executor.resources import current_rss, peak_rss

REPORT = (
    "import json; from spark_keras_ml.executor.resources import current_rss, peak_rss; "
    "print(json.dumps([current_rss(), peak_rss()]))"
)


def test_peak_is_at_least_the_current_figure() -> None:
    assert peak_rss() >= current_rss() > 0


def test_a_process_started_by_a_large_one_reports_its_own_peak() -> None:
    """A Python worker is exec'd by a process (Spark's JVM, here this one) that already holds
    much more memory: its peak must be its own, not what getrusage carries across exec."""
    ballast = bytearray(600 * 1024 * 1024)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page: resident
    done = subprocess.run(
        [sys.executable, "-c", REPORT], capture_output=True, text=True, timeout=60, check=True
    )
    del ballast
    current, peak = json.loads(done.stdout)
    assert current <= peak < 300 * 1024 * 1024, (current, peak)
