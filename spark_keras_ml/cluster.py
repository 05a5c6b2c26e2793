"""What the driver needs to know about the cluster: task slots, CPUs per task, the driver host."""

from __future__ import annotations

import re
import time

from pyspark.sql import SparkSession

#: How long to wait for executors to register before counting task slots (local-cluster and
#: real clusters start executors asynchronously).
_SLOT_WAIT_SECONDS = 30.0


def task_cpus(spark: SparkSession) -> int:
    return int(spark.conf.get("spark.task.cpus", "1") or "1")


def master(spark: SparkSession) -> str:
    return spark.conf.get("spark.master", "") or ""


def driver_host(spark: SparkSession) -> str:
    """Where the parameter server binds: loopback for local masters, else the driver host."""
    if master(spark).startswith("local"):
        return "127.0.0.1"
    return spark.conf.get("spark.driver.host", "127.0.0.1") or "127.0.0.1"


def task_slots(spark: SparkSession, wanted: int = 0) -> int:
    """The most tasks that can run at once (the limit for a barrier stage).

    Waits up to a short while for executors to register when fewer than ``wanted`` are there yet.
    """
    local = _local_slots(master(spark), task_cpus(spark))
    if local is not None:
        return local
    deadline = time.monotonic() + _SLOT_WAIT_SECONDS
    while True:
        slots = _jvm_slots(spark)
        if slots >= wanted or time.monotonic() > deadline:
            return slots
        time.sleep(0.5)


def _local_slots(master_url: str, cpus: int) -> int | None:
    if master_url == "local":
        return 1
    match = re.fullmatch(r"local\[(\d+|\*)(?:,\s*\d+)?\]", master_url)
    if match is None:
        return None
    if match.group(1) == "*":
        import os

        return max(1, (os.cpu_count() or 1) // cpus)
    return max(1, int(match.group(1)) // cpus)


def _jvm_slots(spark: SparkSession) -> int:
    """Slots of the registered executors, from the scheduler (classic Spark only)."""
    sc = spark.sparkContext
    jsc = sc._jsc.sc()
    profile = jsc.resourceProfileManager().defaultResourceProfile()
    return int(jsc.maxNumConcurrentTasks(profile))
