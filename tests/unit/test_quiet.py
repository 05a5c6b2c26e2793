"""TensorFlow's import prints no banners, unless the user asked for its INFO lines."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = (
    "import os\n"
    "from spark_keras_ml.quiet import import_tensorflow\n"
    "import_tensorflow()\n"
    "import tensorflow as tf\n"
    "tf.constant(1.0) + 1\n"
    "print(os.environ['TF_CPP_MIN_LOG_LEVEL'])\n"
)


def run(level: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP_")}
    if level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = level
    return subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=120
    )


def test_tensorflow_imports_without_banners() -> None:
    result = run(None)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"  # the level a worker's later C++ logs keep to
    assert result.stderr == "", result.stderr


def test_a_user_who_asked_for_tensorflows_info_lines_gets_them() -> None:
    result = run("0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"
    assert "oneDNN" in result.stderr or "cpu_feature_guard" in result.stderr, result.stderr


def test_what_is_not_a_banner_still_reaches_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    import re

    from spark_keras_ml.quiet import filtered_stderr

    with filtered_stderr(re.compile("banner")):
        os.write(2, b"a banner\nan error that matters\n")
    assert capfd.readouterr().err == "an error that matters\n"
