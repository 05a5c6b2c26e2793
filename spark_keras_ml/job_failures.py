"""Why Spark failed a training job, and what the fit's error says about it.

Read from the job's exception (classic Spark's Py4J text or Spark Connect's, whose words differ:
"cancelled" and "canceled") and, where the parameter server aborted the fit, from its reason;
the message names the worker that was lost, where it ran and what it was doing.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass

from spark_keras_ml.config import format_bytes
from spark_keras_ml.ps.messages import Hello

_PYTHON_ERROR = re.compile(r"^(?!(?:org|java|scala|py4j)\.)[A-Za-z_][\w.]*(?:Error|Exception): \S")


@dataclass(frozen=True)
class JobFailure:
    """Why Spark failed a training job, read from its exception: the cause, and whether a rerun
    could go differently."""

    cause: str
    #: "cancelled" (a user cancelled it: never rerun), "environment" (a worker could not import
    #: a module), "input" (bad data or configuration), "memory" (a worker ran out of memory:
    #: a MemoryError, or a worker killed without a Python error, as the out-of-memory killer and
    #: container limits do), "server" (the parameter server aborted the fit, saying why), or
    #: "lost" (a task or executor was lost).
    kind: str
    #: The partition of the task that failed (a training task's index is its partition), and
    #: where it ran ("host executor N"), where Spark's message says.
    partition: int | None = None
    where: str = ""

    @property
    def rerun_helps(self) -> bool:
        # An import or a bad row fails every attempt the same way; a cancel is the user's word.
        # A killed worker may have lost its executor rather than its memory: it is rerun.
        return self.kind == "lost" or (self.kind == "memory" and "MemoryError" not in self.cause)


#: Failure kinds that a task's own error explains: reported over what the server saw of it.
TASK_CAUSES = ("environment", "input", "memory")

#: Python errors a rerun meets again: the data or the configuration, not a lost task.
_INPUT_ERRORS = ("ValueError", "TypeError", "KeyError")
#: How Spark says a Python worker died without a Python error (the OOM killer's SIGKILL, a
#: container's memory limit).
_KILLED = re.compile(
    r"Python worker exited unexpectedly \(crashed\)[^\n]*|exit(?:ed with)? code 137|"
    r"killed by signal 9|Container killed[^\n]*memory[^\n]*"
)
#: How Spark names the task a job failed for: "Lost task 1.0 in stage 5.0 (TID 7) (host
#: executor 1)", or in a barrier stage "barrier task ResultTask(5, 1) finished unsuccessfully".
_LOST_TASK = re.compile(
    r"Lost task (\d+)\.\d+ in stage [\d.]+ \(TID \d+\) \(([^)]*)\)"
    r"|barrier task ResultTask\(\d+, (\d+)\)()"
)
#: How Spark says a job was cancelled: "Job 3 cancelled ..." on classic Spark, "[OPERATION_CANCELED]
#: Operation has been canceled." when a Spark Connect client interrupts it.
_CANCELLED = re.compile(r"cancel+ed", re.IGNORECASE)
_MISSING_MODULE = re.compile(r"(?:ModuleNotFoundError|ImportError): .*?No module named '([\w.]+)'")


def job_failure(exc: BaseException, server_failure: str | None = None) -> JobFailure:
    """Classify a failed training job (the cause stays chained to whatever the caller raises).

    The cause is the executor's own Python error when there is one (its traceback is inside
    Spark's exception text), else the first line that names an error. ``server_failure``, why
    the parameter server aborted the fit (a worker's report, a lost connection, a timeout),
    says more than Spark's cancel of the job that followed, unless a task's own error (memory,
    imports, data) explains both.
    """
    failure = _job_failure(exc)
    if server_failure is not None and failure.kind not in TASK_CAUSES:
        kind = "memory" if "MemoryError" in server_failure else "server"
        failure = JobFailure(server_failure, kind)
    lost = _LOST_TASK.search(str(exc))
    if lost is None:
        return failure
    partition, where = (lost.group(1), lost.group(2)) if lost.group(1) else lost.group(3, 4)
    return dataclasses.replace(failure, partition=int(partition), where=where)


def _job_failure(exc: BaseException) -> JobFailure:
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    cause = next(
        (line for line in lines if _PYTHON_ERROR.match(line)),
        next(
            (line for line in lines if "Error" in line or "exited" in line),
            lines[0] if lines else "",
        ),
    )
    if _PYTHON_ERROR.match(cause) is None and _CANCELLED.search(text):
        return JobFailure(next(line for line in lines if _CANCELLED.search(line)), "cancelled")
    name = cause.split(":", 1)[0].rsplit(".", 1)[-1]
    killed = _KILLED.search(text)
    if name == "MemoryError":
        return JobFailure(cause, "memory")
    if killed is not None and _PYTHON_ERROR.match(cause) is None:
        return JobFailure(killed.group(0), "memory")
    if name in ("ModuleNotFoundError", "ImportError"):
        return JobFailure(cause, "environment")
    if name in _INPUT_ERRORS:
        return JobFailure(cause, "input")
    return JobFailure(cause, "lost")


def job_failure_message(
    failure: JobFailure, mode: str, retries: int, hellos: Mapping[int, Hello] | None = None
) -> str:
    """A short message for a training job that Spark failed, saying what to do about it.

    ``hellos``: what each partition's worker said of its rows and its memory limit when it
    registered (the parameter server keeps them), for a worker lost to memory.
    """
    cause = failure.cause[:500]
    if failure.kind == "server":
        return f"Distributed training failed: {failure.cause}"
    if failure.kind == "cancelled":
        return (
            f"Distributed training was cancelled ({cause}). A cancelled fit is not rerun, "
            "whatever syncRetries says: fit again to train."
        )
    if failure.kind == "environment":
        module = _MISSING_MODULE.search(cause)
        missing = f"`{module.group(1)}`" if module else "a module"
        return (
            f"Distributed training failed: a Spark Python worker could not import {missing} "
            f"({cause}). The executors run a Python environment without it: point "
            "PYSPARK_PYTHON (spark.pyspark.python) at an interpreter that has spark_keras_ml "
            "and its dependencies (pyarrow, pandas, keras and its backend), install them in "
            "the cluster's environment, or ship pure-Python modules with --py-files "
            "(SparkContext.addPyFile; through Spark Connect, SparkSession.addArtifacts(path, "
            "pyfile=True)). Rerunning would fail the same way, so it was not rerun."
        )
    if mode == "sync":
        rerun = (
            f"A sync fit stops when any worker fails (it was rerun {retries} times); set "
            "syncRetries to rerun it from the last committed round."
        )
    else:
        rerun = "Spark retried the failed task up to spark.task.maxFailures times."
    if failure.kind == "memory":
        if "MemoryError" in cause:  # the worker's own error says which it was, and its size
            return (
                f"Distributed training failed: a worker ran out of memory ({cause}). "
                f"{MEMORY_ADVICE}"
            )
        memory = f"{_lost_worker(failure, hellos or {})}{MEMORY_ADVICE}"
        # No Python error: the out-of-memory killer or a container limit, most often; or the
        # worker's executor was lost, which a rerun can get past.
        return (
            f"Distributed training failed: a worker was killed without a Python error "
            f"({cause}), most often for memory. {memory} If its executor was lost instead: "
            f"{rerun}"
        )
    if failure.kind == "input":
        return (
            f"Distributed training failed: the Spark job failed ({cause}). Fix the data or "
            "the configuration the error names: every rerun would fail the same way."
        )
    return f"Distributed training failed: the Spark job failed ({cause}). {rerun}"


#: What to do about a worker out of memory.
MEMORY_ADVICE = (
    "A worker needs TensorFlow's 0.7-1 GB, plus its partition where it keeps it in memory "
    "(dataCache='memory'; 'auto', the default, moves it to local disk past a third of the "
    "worker's room): use dataCache='disk' (the worker streams its rows from Spark's local "
    "directories), more numWorkers (smaller partitions), or give the executors more memory "
    "(spark.executor.memory and spark.executor.memoryOverhead, or the container's limit); "
    "fitted.summary.workers reports each worker's data_bytes, cache and peak memory in a fit "
    "that succeeds."
)


def _lost_worker(failure: JobFailure, hellos: Mapping[int, Hello]) -> str:
    """Which worker was lost, how large its rows were and its limit, as far as known."""
    if failure.partition is None:
        return ""
    worker = f"The worker of partition {failure.partition}"
    if failure.where:
        worker += f" ({failure.where})"
    hello = hellos.get(failure.partition)
    if hello is None:
        return (
            f"{worker} was lost before it registered with the parameter server (while it read "
            "its rows or built its model), so its rows' size is not known. "
        )
    held = f"{format_bytes(hello.data_bytes)} of rows as float32"
    kept = {"memory": " kept in memory", "disk": " kept on disk"}.get(hello.cache, "")
    limit = hello.memory_limit
    room = (
        f", and could use {format_bytes(limit)} ({hello.limit_source})" if limit is not None else ""
    )
    return f"{worker} had {held}{kept}{room}. "
