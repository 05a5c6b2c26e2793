"""Where a worker keeps its rows: what limits its memory (cgroups, an address-space limit, its
share of the machine), and the cache each dataCache gives, with the same training and held-out
rows whichever it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spark_keras_ml.config import Layout, TrainConfig
from spark_keras_ml.executor import data_cache
from spark_keras_ml.executor.data_cache import cache_partition
from spark_keras_ml.executor.memory_limit import cgroup_limit, worker_limit
from spark_keras_ml.executor.rows import Rows
from spark_keras_ml.executor.spill import SpilledRows

MB = 1 << 20
LAYOUT = Layout(inputs=((3,),), targets=((),), input_names=("x",), target_names=("y",))


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_cgroup_v1_limit_is_the_smallest_up_to_the_mounts_root(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Inside a container the mount's root is the container's cgroup while /proc names the
    path from the host's root: the existing tail of the path is the process's cgroup."""
    root = tmp_path / "cgroup"
    write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")  # unlimited
    write(root / "memory" / "job" / "memory.limit_in_bytes", f"{800 * MB}\n")
    write(root / "memory" / "job" / "w1" / "memory.limit_in_bytes", f"{1200 * MB}\n")
    proc = tmp_path / "cgroup-of-self"
    write(proc, "9:pids:/\n4:memory:/host/side/job/w1\n0::/\n")
    assert cgroup_limit(proc, root) == 800 * MB
    write(proc, "4:memory:/elsewhere\n")  # no such tail: the mount's root, unlimited
    assert cgroup_limit(proc, root) is None


def test_a_cgroup_v2_limit_and_max(tmp_path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "cgroup"
    write(root / "app" / "memory.max", "max\n")
    proc = tmp_path / "cgroup-of-self"
    write(proc, "0::/app\n")
    assert cgroup_limit(proc, root) is None
    write(root / "app" / "memory.max", f"{512 * MB}\n")
    assert cgroup_limit(proc, root) == 512 * MB


def run_python(code: str, preexec=None) -> str:  # type: ignore[no-untyped-def]
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=preexec,
        timeout=60,
    )
    return done.stdout


def test_an_address_space_limit_is_read_as_the_room_left_in_it() -> None:
    """What spark.executor.pyspark.memory sets: the limit is what resident memory can still
    grow by, not the address space itself (mapped but untouched pages count there)."""
    out = run_python(
        """
        import json, resource
        from spark_keras_ml.executor.resources import current_rss, proc_bytes
        size = proc_bytes("VmSize")
        resource.setrlimit(resource.RLIMIT_AS, (size + (300 << 20), resource.RLIM_INFINITY))
        from spark_keras_ml.executor.memory_limit import worker_limit
        limit = worker_limit()
        print(json.dumps([limit.bytes, limit.source, current_rss()]))
        """
    )
    limit, source, rss = json.loads(out)
    assert "address-space limit" in source and "pyspark.memory" in source
    assert rss + 200 * MB < limit < rss + 400 * MB


@pytest.mark.skipif(
    not os.access("/sys/fs/cgroup/memory", os.W_OK), reason="needs a writable cgroup v1"
)
def test_a_real_cgroup_limit_is_the_workers_limit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    group = Path("/sys/fs/cgroup/memory") / f"skml-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(700 * MB))
        out = run_python(
            f"""
            import json, os
            with open("{group}/cgroup.procs", "w") as f:
                f.write(str(os.getpid()))
            from spark_keras_ml.executor.memory_limit import worker_limit
            limit = worker_limit()
            print(json.dumps([limit.bytes, limit.source]))
            """
        )
        limit, source = json.loads(out)
        assert limit == 700 * MB and "cgroup" in source
    finally:
        group.rmdir()


def test_a_worker_never_counts_on_more_than_its_share_of_the_machine() -> None:
    """Every core may run a task at once, each with a worker of its own: one worker's share is
    the machine's memory over them (or less, where a tighter limit is set)."""
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
    cores = os.cpu_count() or 1
    assert worker_limit(task_cpus=1).bytes <= total // cores
    assert worker_limit(task_cpus=cores).bytes <= total
    assert worker_limit(task_cpus=1).bytes <= worker_limit(task_cpus=cores).bytes


def config(cache: str, validation_split: float = 0.25) -> TrainConfig:
    return TrainConfig(
        host="127.0.0.1",
        port=0,
        secret=b"",
        model_bytes=b"",
        compile_config={},
        frequency="epoch",
        epochs=1,
        batch_size=8,
        timeout=30.0,
        seed=5,
        task_cpus=1,
        layout=LAYOUT,
        validation_split=validation_split,
        data_cache=cache,
    )


def batches(count: int, size: int) -> list[pd.DataFrame]:
    frames = []
    for b in range(count):
        ids = np.arange(b * size, (b + 1) * size)
        x = [np.array([i, i + 0.5, -i], dtype=np.float64) for i in ids]
        frames.append(pd.DataFrame({"x0": pd.Series(x, dtype=object), "y0": ids % 2}))
    return frames


def rows_of(cached: Rows | SpilledRows) -> np.ndarray:
    if isinstance(cached, SpilledRows):
        chunks = list(cached.chunks(8))
        return np.concatenate([c[0] for c in chunks]) if chunks else np.zeros((0, 3))
    return cached.inputs[0]


@pytest.mark.parametrize("cache", ["disk", "auto"])
def test_every_cache_holds_the_same_training_and_held_out_rows(
    tmp_path, monkeypatch, cache
) -> None:  # type: ignore[no-untyped-def]
    """ "auto" here switches to disk halfway (its budget made tiny), moving the rows it holds:
    the rows and the held-out split are the memory path's, in the same order."""
    monkeypatch.setattr(data_cache, "MEMORY_SHARE", 1e-9 if cache == "auto" else 1 / 3)
    expected = cache_partition(batches(6, 50), config("memory"), 2, folder=lambda: tmp_path)
    assert expected.cache == "memory" and expected.spill_bytes == 0
    got = cache_partition(batches(6, 50), config(cache), 2, folder=lambda: tmp_path)
    assert got.cache == "disk" and got.spill_bytes > 0
    assert "passed" in got.reason if cache == "auto" else got.reason == "dataCache='disk'"
    assert got.data_bytes == expected.data_bytes == 300 * (3 + 1) * 4
    assert len(got.train) + len(got.held_out) == 300 and 0 < len(got.held_out) < 150
    np.testing.assert_array_equal(rows_of(got.train), rows_of(expected.train))
    np.testing.assert_array_equal(rows_of(got.held_out), rows_of(expected.held_out))


def test_auto_keeps_a_small_partition_in_memory_saying_why(tmp_path) -> None:  # type: ignore[no-untyped-def]
    def no_folder() -> Path:
        raise AssertionError("a partition kept in memory needs no spill folder")

    got = cache_partition(batches(2, 10), config("auto"), 0, folder=no_folder)
    assert got.cache == "memory" and "within a third" in got.reason
    assert got.limit.source in got.reason


def test_without_proc_meminfo_the_machines_size_comes_from_sysconf(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A share of 0 (no /proc, as on macOS) would send every "auto" partition to disk."""
    from spark_keras_ml.executor.memory_limit import _machine_share

    share = _machine_share(1, meminfo=str(tmp_path / "no-meminfo"))
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert share.bytes == physical // max(1, os.cpu_count() or 1) > 0
