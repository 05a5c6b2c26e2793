"""The paths the server inside the cluster can write checkpoints to (Arrow's file systems)."""

from __future__ import annotations

from pathlib import Path

import pytest

from spark_keras_ml.filesystems import ArrowFiles


@pytest.mark.parametrize(
    ("given", "seen"),
    [
        ("/data/ckpt", "/data/ckpt"),
        ("file:/data/ckpt", "file:/data/ckpt"),
        ("s3a://bucket/ckpt", "s3://bucket/ckpt"),
        ("s3n://bucket/ckpt", "s3://bucket/ckpt"),
        ("hdfs://namenode:8020/ckpt", "hdfs://namenode:8020/ckpt"),
    ],
)
def test_hadoop_names_are_read_as_arrow_knows_them(given: str, seen: str) -> None:
    assert ArrowFiles.check(given) == seen


@pytest.mark.parametrize("relative", ["ckpt", "runs/ckpt", "./ckpt"])
def test_a_relative_path_is_refused(relative: str) -> None:
    with pytest.raises(ValueError, match=r"absolute path or a URI.*Received: checkpointDir="):
        ArrowFiles.check(relative)


def test_a_scheme_no_file_system_knows_is_named() -> None:
    with pytest.raises(ValueError, match=r"fsspec.*Received: checkpointDir='nosuchfs://x/y'"):
        ArrowFiles("nosuchfs://x/y")


def test_a_local_directory_round_trip(tmp_path: Path) -> None:
    files = ArrowFiles(f"file:{tmp_path}/ckpt")
    files.mkdirs("epoch-1")
    files.create("epoch-1/.a.tmp", b"payload")
    assert files.rename("epoch-1/.a.tmp", "epoch-1/a")
    assert files.read("epoch-1/a") == b"payload" and not files.exists("epoch-1/.a.tmp")
    assert files.folders() == ["epoch-1"]
    files.delete("epoch-1", True)
    assert files.folders() == [] and files.exists("")
