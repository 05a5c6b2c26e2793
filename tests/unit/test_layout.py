"""The tree shows where code runs: which modules may import which, read from the source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "spark_keras_ml"
#: What executor code may import besides itself: the contract, model bytes, the ps client side,
#: TensorFlow's logging environment, and the checkpoint layout (read inside the cluster under
#: Spark Connect, where the server writes it).
EXECUTOR_MAY_IMPORT = (
    "spark_keras_ml.checkpoint",
    "spark_keras_ml.filesystems",
    "spark_keras_ml.config",
    "spark_keras_ml.serialization",
    "spark_keras_ml.ps",
    "spark_keras_ml.quiet",
)
#: The only driver modules that import executor code: each names the function Spark ships.
SHIPPED = {
    "spark_keras_ml.fit": {"spark_keras_ml.executor.train": {"train_partition"}},
    "spark_keras_ml.transformer": {"spark_keras_ml.executor.predict": {"predict_batches"}},
    "spark_keras_ml.in_cluster": {
        "spark_keras_ml.executor.server_host": {
            "REPLY_SCHEMA",
            "START_SCHEMA",
            "ask_server",
            "read_checkpoint",
            "start_server",
        }
    },
}


#: Code that scores where no Spark runs (MLflow's pyfunc flavor), with the executors' own
#: featurization and output code, so that it scores exactly as ``transform`` does.
SCORES_LIKE_AN_EXECUTOR = {
    "spark_keras_ml.mlflow_pyfunc": {
        "spark_keras_ml.executor.outputs": {"OUTPUTS", "flat_outputs"},
        "spark_keras_ml.executor.predict": {"trace_for_any_batch"},
        "spark_keras_ml.executor.rows": {"column_to_numpy", "structure", "to_shape"},
        "spark_keras_ml.executor.values": {"as_tensors"},
    }
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, *, top_level_only: bool = False) -> dict[str, set[str]]:
    """The package modules ``path`` imports, with the names taken from each.

    ``top_level_only``: just what runs at import (not inside functions or ``if TYPE_CHECKING``).
    """
    tree = ast.parse(path.read_text())
    found: dict[str, set[str]] = {}

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "spark_keras_ml":  # from spark_keras_ml import cluster
                    for alias in node.names:
                        found.setdefault(f"spark_keras_ml.{alias.name}", set())
                elif node.module.startswith("spark_keras_ml"):
                    found.setdefault(node.module, set()).update(a.name for a in node.names)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("spark_keras_ml"):
                        found.setdefault(alias.name, set())
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                if not top_level_only:
                    visit(node.body)
            elif not top_level_only:
                visit([n for n in ast.iter_child_nodes(node) if isinstance(n, ast.stmt)])

    visit(tree.body)
    return {name: names for name, names in found.items() if name in MODULES}


def side(name: str) -> str:
    if name.startswith("spark_keras_ml.executor"):
        return "executor"
    if name.startswith("spark_keras_ml.ps"):
        return "ps"
    return "driver"


@pytest.mark.parametrize("name", [n for n in MODULES if side(n) == "executor"])
def test_executor_code_imports_only_the_contract_the_client_and_itself(name: str) -> None:
    allowed = (*EXECUTOR_MAY_IMPORT, "spark_keras_ml.executor")
    bad = [m for m in imports(MODULES[name]) if not m.startswith(allowed)]
    assert not bad, f"{name} (runs on executors) imports driver modules {bad}"


@pytest.mark.parametrize("name", [n for n in MODULES if side(n) == "ps"])
def test_the_parameter_server_imports_nothing_above_it(name: str) -> None:
    bad = [m for m in imports(MODULES[name]) if side(m) != "ps"]
    assert not bad, f"{name} imports {bad} from above ps/"


@pytest.mark.parametrize("name", [n for n in MODULES if side(n) == "driver"])
def test_driver_code_names_executor_code_only_as_the_function_spark_ships(name: str) -> None:
    used = {m: names for m, names in imports(MODULES[name]).items() if side(m) == "executor"}
    allowed = SHIPPED.get(name, SCORES_LIKE_AN_EXECUTOR.get(name, {}))
    assert used == allowed, f"{name} imports executor code: {used}"


def test_no_import_cycles() -> None:
    graph = {name: set(imports(path, top_level_only=True)) for name, path in MODULES.items()}
    done: set[str] = set()

    def walk(name: str, trail: list[str]) -> None:
        if name in trail:
            raise AssertionError("import cycle: " + " -> ".join([*trail, name]))
        if name in done:
            return
        for child in graph[name]:
            walk(child, [*trail, name])
        done.add(name)

    for name in graph:
        walk(name, [])


def test_no_module_is_over_500_lines() -> None:
    long = {n: len(p.read_text().splitlines()) for n, p in MODULES.items()}
    assert not {n: lines for n, lines in long.items() if lines > 500}


def test_importing_the_executor_entry_points_loads_no_keras() -> None:
    """A task sizes TensorFlow's thread pools before the first import of Keras."""
    code = (
        "import sys, spark_keras_ml.executor.train, spark_keras_ml.executor.predict\n"
        "loaded = [m for m in ('keras', 'tensorflow') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
