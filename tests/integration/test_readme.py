"""Every ```python block of the README runs as written, in order, in one fresh interpreter with
a real local[2] Spark (the Quickstart starts it), from an empty working directory. The tuning
block saves over the model the Quickstart saved, so a rerun meeting its own saved files is part
of the one run.

A block that cannot run is marked by an HTML comment on the line before its fence,
``<!-- not run: why -->``; the marker shows on GitHub's source view and here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.M | re.S
)
NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<why>\S.*?)\s*-->\s*$")

#: Runs the blocks given as JSON on stdin, each compiled under the README's name with its own
#: line numbers, so that a traceback points at the README's line.
RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for block in json.load(sys.stdin):
    print(f"--- README.md line {block['line']}", flush=True)
    padded = "\\n" * (block["line"] - 1) + block["code"]
    exec(compile(padded, "README.md", "exec"), namespace)
print("--- all blocks ran", flush=True)
"""


def python_blocks() -> tuple[list[dict[str, object]], list[str]]:
    """The blocks to run (code and first line), and why each skipped one is skipped."""
    text = README.read_text()
    blocks: list[dict[str, object]] = []
    skipped: list[str] = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        line = text.count("\n", 0, match.start("code")) + 1
        marker = NOT_RUN.search(before)
        if marker:
            skipped.append(f"line {line}: {marker['why']}")
            continue
        blocks.append({"line": line, "code": textwrap.dedent(match["code"])})
    return blocks, skipped


def test_the_readme_finds_its_blocks_and_few_are_skipped() -> None:
    blocks, skipped = python_blocks()
    assert len(blocks) >= 4, blocks  # the Quickstart, structured data, controls, tuning
    assert len(skipped) <= 2, skipped
    assert "SparkSession" in str(blocks[0]["code"])  # the Quickstart starts its own session


def run_blocks(
    blocks: list[dict[str, object]], cwd: Path, env: dict[str, str], timeout: float = 300
) -> str:
    """Run ``blocks`` in one fresh interpreter in ``cwd``; its output (failing unless every
    block ran)."""
    result = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(blocks),
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )
    output = f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert result.returncode == 0, output
    assert result.stdout.rstrip().endswith("--- all blocks ran"), output
    return result.stdout + result.stderr


@pytest.mark.own_spark
def test_every_python_block_of_the_readme_runs_as_written(tmp_path: Path) -> None:
    blocks, _ = python_blocks()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSPARK_")}
    run_blocks(blocks, tmp_path, env)
