"""How the driver words a failed training job, from Spark's own exception text (as Spark
writes it, captured from real failures) and what the workers said of themselves."""

from __future__ import annotations

import pytest

from spark_keras_ml.job_failures import job_failure, job_failure_message
from spark_keras_ml.ps.messages import Hello

CRASHED = (
    "Python worker exited unexpectedly (crashed). Consider setting "
    "'spark.python.worker.faulthandler.enabled' configuration to 'true' for the better Python "
    "traceback."
)
BARRIER = (
    "An error occurred while calling o95.collectToPython.\n: org.apache.spark.SparkException: "
    "Job aborted due to stage failure: Could not recover from a failed barrier ResultStage. "
    "Most recent failure reason: Stage failed because barrier task ResultTask(3, 1) finished "
    f"unsuccessfully.\norg.apache.spark.SparkException: {CRASHED}\nCaused by: "
    "java.io.EOFException"
)
LOST_TASK = (
    "Job aborted due to stage failure: Task 0 in stage 5.0 failed 4 times, most recent failure: "
    "Lost task 0.3 in stage 5.0 (TID 9) (10.0.0.7 executor 2): org.apache.spark.SparkException: "
    f"{CRASHED}"
)


def test_a_killed_worker_is_named_with_its_rows_and_its_limit() -> None:
    failure = job_failure(RuntimeError(BARRIER))
    assert failure.kind == "memory" and failure.partition == 1 and failure.rerun_helps
    hello = Hello(
        partition=1,
        attempt=7,
        run=0,
        rows=1000,
        data_bytes=1536 << 20,
        cache="memory",
        memory_limit=2 << 30,
        limit_source="the cgroup's memory limit of 2.00 GiB",
    )
    message = job_failure_message(failure, "sync", 0, {1: hello})
    assert "The worker of partition 1 had 1.50 GiB of rows as float32 kept in memory" in message
    assert "could use 2.00 GiB (the cgroup's memory limit of 2.00 GiB)" in message
    assert "dataCache='disk'" in message and "numWorkers" in message
    assert "syncRetries" in message  # a lost executor, too, is killed without a Python error


def test_a_worker_lost_before_it_registered_says_so_and_where_it_ran() -> None:
    failure = job_failure(RuntimeError(LOST_TASK))
    assert failure.partition == 0 and failure.where == "10.0.0.7 executor 2"
    message = job_failure_message(failure, "async", 0, {})
    assert (
        "The worker of partition 0 (10.0.0.7 executor 2) was lost before it registered" in message
    )
    assert "spark.task.maxFailures" in message


def test_a_workers_own_memory_error_is_its_message() -> None:
    text = (
        f'{LOST_TASK}\nTraceback (most recent call last):\n  File "train.py"\nMemoryError: '
        "partition 0 ran out of memory reading its rows (in memory, 657 MiB as float32 read so "
        "far) with 1.34 GiB the worker may use (an address-space limit of 2.00 GiB "
        "(spark.executor.pyspark.memory))"
    )
    failure = job_failure(RuntimeError(text))
    assert failure.kind == "memory" and not failure.rerun_helps
    message = job_failure_message(failure, "sync", 0, {})
    assert "ran out of memory (MemoryError: partition 0 ran out of memory reading" in message
    assert "was lost" not in message and "dataCache='disk'" in message


@pytest.mark.parametrize(
    "text",
    [
        # Classic Spark, after SparkContext.cancelJobsWithTag or cancelAllJobs.
        "An error occurred while calling o95.collectToPython.\n: org.apache.spark.SparkException: "
        "Job 12 cancelled part of cancelled job tags spark_keras_ml-fit-0f3a",
        # A Spark Connect client, after SparkSession.interruptAll or interruptTag.
        "(org.apache.spark.SparkSQLException) [OPERATION_CANCELED] Operation has been canceled. "
        "SQLSTATE: HY008",
    ],
)
def test_a_cancelled_job_is_named_so_and_not_rerun_in_either_spelling(text: str) -> None:
    failure = job_failure(RuntimeError(text))
    assert failure.kind == "cancelled" and not failure.rerun_helps
    assert failure.cause == text.splitlines()[-1]
    message = job_failure_message(failure, "sync", 2, {})
    assert message.startswith(f"Distributed training was cancelled ({failure.cause}).")
    assert "A cancelled fit is not rerun, whatever syncRetries says" in message
