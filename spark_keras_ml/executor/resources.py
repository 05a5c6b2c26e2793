"""What a Python worker's task uses of its machine: malloc arenas, memory, time.

Threads and devices are the backend's (:mod:`~spark_keras_ml.executor.backend`). No Keras at
import.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import time

import pyarrow as pa

#: glibc's mallopt parameter for the most malloc arenas, and the most a worker uses.
_M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def limit_malloc_arenas() -> None:
    """Let at most :data:`MALLOC_ARENAS` malloc arenas serve this worker's threads.

    glibc gives each new thread that allocates an arena of its own, up to eight per core, each
    reserving 64 MB of address space: TensorFlow's and tf.data's threads took 500 MB of it in a
    fit, which an address-space limit (``spark.executor.pyspark.memory``) counts as used, and
    each arena keeps freed memory of its own. Two serve a worker's few busy threads as fast.
    """
    try:
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):  # not glibc
        pass


def release_memory() -> None:
    """Give back what a finished training task freed: Spark reuses this Python worker, and
    without this each fit left it about 100 MB larger (freed pandas and Arrow buffers, the
    model's graphs) for the next one to start from."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc: return freed heap pages to the OS
    except (OSError, AttributeError):  # not glibc
        pass


class Stopwatch:
    """Seconds between laps, for the phases a training task reports."""

    def __init__(self) -> None:
        self._start = self._last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        return seconds

    def total(self) -> float:
        return time.perf_counter() - self._start


def current_rss() -> int:
    """Resident memory of this process now, in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def reset_peak_rss() -> None:
    """Start :func:`peak_rss` over from the memory held now: Spark reuses a Python worker for
    task after task, and its high-water mark would otherwise be an earlier task's (Linux 4.0+;
    elsewhere the peak stays the process's)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    """The most resident memory this process has had, in bytes.

    From /proc's ``VmHWM``, the high-water mark of this process's own memory: ``getrusage``'s
    ``ru_maxrss`` survives ``exec``, so in a Python worker whose daemon the JVM started it
    reported the JVM's peak (6.3 GB for a worker of 1 GB). The high-water mark and /proc's
    current figure count pages slightly differently; the larger of the two keeps "peak >= any
    earlier current reading" true.
    """
    peak = proc_bytes("VmHWM")
    if peak is None:  # no /proc (macOS): the rusage figure, in bytes there
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak if sys.platform == "darwin" else peak * 1024
    return int(max(peak, current_rss()))


def proc_bytes(field: str, path: str = "/proc/self/status") -> int | None:
    """A ``kB`` field of a /proc file (this process's status by default) in bytes, or None
    where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
