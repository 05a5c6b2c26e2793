"""`make demo` is quiet: what it prints is the fit's progress and the demo's results, not the
banners of TensorFlow and the JVM (30 of its 56 lines once)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

#: What the package and the demo print: a line per epoch (verbose="auto" off a terminal) and
#: the demo's two results.
OURS = re.compile(
    r"^Epoch \d+/\d+ - \d+(\.\d+)?m?s - accuracy: \d\.\d{4} - loss: \d+\.\d{4}$"
    r"|^holdout accuracy \d\.\d{4}, fit \d+\.\d s$"
    r"|^saved to .+ and loaded back: identical predictions = True$"
)
#: Lines from elsewhere that a run may print: the JVM's note on its incubator module and, on a
#: machine whose hostname resolves to loopback, Spark's two lines about it.
MOST_FOREIGN_LINES = 5


@pytest.mark.own_spark
def test_the_demo_prints_its_progress_and_results_and_little_else(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The defaults are under test: none of the variables a user could quiet TensorFlow with.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP_")}
    result = subprocess.run(
        [sys.executable, "-m", "spark_keras_ml.demo", "--epochs", "2", "--master", "local[2]"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=240,
    )
    lines = (result.stdout + result.stderr).splitlines()
    assert result.returncode == 0, "\n".join(lines)
    ours = [line for line in lines if OURS.match(line)]
    foreign = [line for line in lines if not OURS.match(line)]
    assert [line.split(" - ")[0] for line in ours[:2]] == ["Epoch 1/2", "Epoch 2/2"], lines
    assert len(ours) == 4, lines
    assert len(foreign) <= MOST_FOREIGN_LINES, "\n".join(foreign)
    assert not [line for line in foreign if "retracing" in line or "tensorflow" in line.lower()]
