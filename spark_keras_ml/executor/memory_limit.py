"""How much memory a Python worker may use: the tightest of its cgroup's limit, its
address-space limit (what ``spark.executor.pyspark.memory`` sets) and its share of the machine.

Read from the kernel's own files (``/proc``, ``/sys/fs/cgroup``), so it works the same under
YARN, Kubernetes, a container or a bare machine; where a file is missing that limit is simply
not known. No Keras, no Spark: tested against real files and real limits.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

from spark_keras_ml.config import format_bytes as gib
from spark_keras_ml.executor.resources import current_rss, proc_bytes

#: cgroup v1 writes "no limit" as a huge number (a page-rounded 2^63 - 1).
_UNLIMITED = 1 << 62
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class MemoryLimit:
    """The most resident memory this worker may reach, and what sets it."""

    bytes: int
    source: str

    def room(self) -> int:
        """What the worker may still add to its resident memory now."""
        return max(0, self.bytes - current_rss())


def worker_limit(task_cpus: int = 1) -> MemoryLimit:
    """The tightest limit on this worker's memory (see the module's docstring).

    The machine's share is its memory over the tasks its cores run at once
    (``cores / task_cpus``), since the other tasks' workers use theirs at the same time.
    """
    limits = [_machine_share(task_cpus)]
    cgroup = cgroup_limit()
    if cgroup is not None:
        limits.append(MemoryLimit(cgroup, f"the cgroup's memory limit of {gib(cgroup)}"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        # An address-space limit counts mappings that are not resident (TensorFlow maps about
        # 1.4 GB it never touches): what is left of it is what resident memory can still grow by.
        room = soft - (proc_bytes("VmSize") or 0)
        limits.append(
            MemoryLimit(
                current_rss() + max(0, room),
                f"an address-space limit of {gib(soft)} (spark.executor.pyspark.memory)",
            )
        )
    return min(limits, key=lambda limit: limit.bytes)


def _machine_share(task_cpus: int, meminfo: str = "/proc/meminfo") -> MemoryLimit:
    # Without /proc (macOS) the machine's size comes from sysconf: a share of 0 would send
    # every "auto" partition to disk.
    total = proc_bytes("MemTotal", meminfo) or os.sysconf("SC_PHYS_PAGES") * os.sysconf(
        "SC_PAGE_SIZE"
    )
    cores = os.cpu_count() or 1
    tasks = max(1, cores // max(1, task_cpus))
    share = total // tasks
    return MemoryLimit(share, f"this machine's {gib(total)} shared by {tasks} tasks at once")


def cgroup_limit(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT
) -> int | None:
    """The memory limit of this process's cgroup and of every cgroup above it (v1 or v2), the
    smallest; None where none is set or none can be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    found: list[int] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # v1
            found += _limits(root / "memory", path, "memory.limit_in_bytes")
        elif controllers == "":  # v2 (the unified hierarchy)
            for mount in (root, root / "unified"):
                found += _limits(mount, path, "memory.max")
    found = [limit for limit in found if limit < _UNLIMITED]
    return min(found) if found else None


def _limits(mount: Path, path: str, name: str) -> list[int]:
    """The limits in ``name`` from the process's cgroup up to the mount's root.

    Inside a container the mount's root is often the container's own cgroup, while
    /proc/self/cgroup names its path from the host's root: the longest tail of that path which
    exists under the mount is the process's cgroup.
    """
    parts = [p for p in path.split("/") if p]
    tails = (mount.joinpath(*parts[i:]) for i in range(len(parts)))
    folder = next((tail for tail in tails if tail.is_dir()), mount)
    limits = []
    while True:
        value = _read_limit(folder / name)
        if value is not None:
            limits.append(value)
        if folder == mount or mount not in folder.parents:
            return limits
        folder = folder.parent


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text in ("", "max") else int(text)
