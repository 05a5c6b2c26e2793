"""The notebooks in notebooks/ run top to bottom in a fresh kernel on this interpreter."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
ACCURACY_CELL = "evaluate"  # the id of the cell that prints the holdout accuracy
EARLY_STOPPING_CELL = "5a4d0438"  # training_controls: the fit with early stopping


def this_interpreter_kernel(kernels_dir: Path) -> KernelManager:
    """A KernelManager for a "python3" kernel that runs ``sys.executable``.

    The kernelspec lives in a private directory, so neither a missing kernelspec (fresh venv) nor
    a user-level "python3" kernelspec pointing at another Python can change what runs.
    """
    spec_dir = kernels_dir / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test interpreter)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(kernels_dir)], ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


def stream_text(cell: nbformat.NotebookNode) -> str:
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")


def run_notebook(
    name: str, tmp_path: Path, env: dict[str, str] | None = None, then: str | None = None
) -> nbformat.NotebookNode:
    """Execute ``notebooks/<name>.ipynb`` in a fresh kernel (with ``env``, else this process's
    environment), and after its own cells the code ``then``; the executed notebook. A failing
    cell raises CellExecutionError with its traceback."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    if then is not None:
        nb.cells.append(nbformat.v4.new_code_cell(then))
    km = this_interpreter_kernel(tmp_path / "kernels")
    client = NotebookClient(
        nb,
        km=km,
        kernel_name="python3",
        timeout=240,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute(**({} if env is None else {"env": env}))
    return nb


def check_outputs(nb: nbformat.NotebookNode, name: str) -> None:
    """The executed notebook printed a holdout accuracy above 0.9; training_controls stopped
    early."""
    (cell,) = [c for c in nb.cells if c.get("id") == ACCURACY_CELL]
    match = re.search(r"holdout accuracy: (\d\.\d{4})", stream_text(cell))
    assert match, cell.outputs
    assert float(match.group(1)) > 0.9
    if name == "training_controls":  # the notebook that shows early stopping stops early
        (fit_cell,) = [c for c in nb.cells if c.get("id") == EARLY_STOPPING_CELL]
        stopped = re.search(
            r"trained (\d+) of 40 epochs; stopped early: (\w+)", stream_text(fit_cell)
        )
        assert stopped and stopped.group(2) == "True", fit_cell.outputs
        assert int(stopped.group(1)) < 40


@pytest.mark.own_spark
def test_the_training_controls_notebook_runs(tmp_path: Path) -> None:
    # The quickstart notebook is the README's Quickstart, which test_readme runs here: under
    # classic Spark this suite runs the notebook that does more; the Connect suite runs both.
    check_outputs(run_notebook("training_controls", tmp_path), "training_controls")
