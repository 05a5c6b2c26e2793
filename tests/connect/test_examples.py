"""The README's examples and both notebooks run unchanged through Spark Connect: with
``SPARK_REMOTE`` naming this suite's server, as the README's "Spark Connect" section says, the
code that starts a local session starts a Connect session instead. And a session built with
``spark.api.mode=connect`` (a local Connect server behind a classic-looking builder) fits and
transforms without a warning.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_notebook import check_outputs, run_notebook
from tests.integration.test_readme import python_blocks, run_blocks

pytestmark = pytest.mark.connect

#: Run after the examples: they ran through a Connect session.
IS_CONNECT = (
    "from spark_keras_ml.server_location import is_connect\n"
    "assert is_connect(spark), f'not a Spark Connect session: {type(spark)}'\n"
)


def client_env(remote: str | None) -> dict[str, str]:
    """A fresh client's environment: none of this process's Spark settings, and
    ``SPARK_REMOTE=remote`` where given."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PYSPARK_")
        and k not in ("SPARK_REMOTE", "SPARK_CONNECT_MODE_ENABLED", "SPARK_LOCAL_REMOTE")
    }
    if remote is not None:
        env["SPARK_REMOTE"] = remote
    return env


@pytest.mark.timeout(480)
def test_every_python_block_of_the_readme_runs_through_connect(
    connect_url: str, tmp_path: Path
) -> None:
    blocks, _ = python_blocks()
    run_blocks([*blocks, {"line": 1, "code": IS_CONNECT}], tmp_path, client_env(connect_url), 420)
    # The README saves to relative paths: the server resolved them, not this client.
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("name", ["quickstart", "training_controls"])
def test_notebook_runs_through_connect(connect_url: str, tmp_path: Path, name: str) -> None:
    nb = run_notebook(name, tmp_path, env=client_env(connect_url), then=IS_CONNECT)
    check_outputs(nb, name)


#: A fresh client whose session is a local Connect server started by ``spark.api.mode``. Building
#: it warns (CANNOT_MODIFY_CONFIG) of the builder's own settings that are not runtime ones: that
#: is pyspark's doing; the fit and the transform must add no warning of Spark's.
API_MODE_SCRIPT = """
import os, sys, tempfile, warnings

os.environ["PYSPARK_PYTHON"] = sys.executable

from pyspark.ml.linalg import Vectors
from pyspark.sql import SparkSession

from spark_keras_ml import KerasEstimator
from spark_keras_ml.server_location import is_connect
from tests.conftest import digits_model

spark = (
    SparkSession.builder.master("local[2]")
    .config("spark.api.mode", "connect")
    .config("spark.sql.shuffle.partitions", "4")
    .getOrCreate()
)
assert is_connect(spark), type(spark)
rows = [(Vectors.dense([(i * 7 + j) % 16 / 16.0 for j in range(64)]), float(i % 10))
        for i in range(400)]
path = os.path.join(tempfile.mkdtemp(), "digits.parquet")
spark.createDataFrame(rows, ["features", "label"]).write.parquet(path)
table = spark.read.parquet(path)  # a Vector column in Parquet: the columnar-input path
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fitted = KerasEstimator(model=digits_model(), epochs=2, numWorkers=2, verbose=0).fit(table)
    scored = fitted.transform(table).select("prediction").collect()
for w in caught:
    print(f"caught {w.category.__name__} from {w.filename}: {w.message}")
print(f"epochs {len(fitted.history['loss'])}, scored {len(scored)} rows", flush=True)
spark.stop()
"""


@pytest.mark.own_spark
def test_a_session_built_with_api_mode_connect_fits_and_transforms_without_warnings(
    tmp_path: Path,
) -> None:
    env = client_env(None)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), *filter(None, [env.get("PYTHONPATH")])]
    )
    result = subprocess.run(
        [sys.executable, "-c", API_MODE_SCRIPT],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
        check=False,
    )
    output = f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert result.returncode == 0, output
    assert "epochs 2, scored 400 rows" in result.stdout, output
    caught = [line for line in result.stdout.splitlines() if line.startswith("caught ")]
    assert not [line for line in caught if "CANNOT_MODIFY" in line or "/pyspark/" in line], caught
