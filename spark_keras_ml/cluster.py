"""What the driver needs to know about the cluster: task slots, CPUs per task, the driver host."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from pyspark.sql import SparkSession
from pyspark.sql.utils import is_remote

if TYPE_CHECKING:
    import pyarrow as pa

logger = logging.getLogger(__name__)

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


#: Spark conf naming the address the parameter server binds (e.g. "0.0.0.0"); by default it
#: binds the driver host only.
BIND_ADDRESS_CONF = "spark.keras.ps.bindAddress"
#: Spark conf that lets a fit open the (unencrypted) parameter server on a cluster whose own
#: traffic is authenticated or encrypted.
ALLOW_UNENCRYPTED_CONF = "spark.keras.ps.allowUnencrypted"


def bind_address(spark: SparkSession) -> str:
    return spark.conf.get(BIND_ADDRESS_CONF, None) or driver_host(spark)


def check_transport_security(conf: Callable[[str, str], str | None]) -> None:
    """Refuse a plaintext server where Spark itself authenticates or encrypts, unless allowed.

    ``conf`` reads a Spark setting (``spark.conf.get``). The parameter server authenticates every
    peer with the per-fit secret but does not encrypt the weights it sends.
    """

    def enabled(key: str) -> bool:
        return (conf(key, "false") or "false").strip().lower() == "true"

    secured = [
        key
        for key in ("spark.authenticate", "spark.ssl.enabled", "spark.network.crypto.enabled")
        if enabled(key)
    ]
    allowed = enabled(ALLOW_UNENCRYPTED_CONF)
    if secured and not allowed:
        raise RuntimeError(
            f"Expected a cluster without {' / '.join(secured)} or an explicit opt-out: the "
            "parameter server authenticates workers but sends weights unencrypted. Set "
            f"{ALLOW_UNENCRYPTED_CONF}=true to accept that. Received: "
            + ", ".join(f"{k}=true" for k in secured)
        )


#: The least address space a Python worker that imports TensorFlow can live in: TensorFlow
#: alone maps about 1.4 GB, and `spark.executor.pyspark.memory` is an address-space limit.
MIN_PYSPARK_MEMORY_MB = 2048
PYSPARK_MEMORY_CONF = "spark.executor.pyspark.memory"


def check_python_memory(conf: Callable[[str, str | None], str | None]) -> None:
    """Refuse a `spark.executor.pyspark.memory` below what a worker importing TensorFlow needs:
    Spark applies it as RLIMIT_AS, and `import tensorflow` then fails with a bare MemoryError
    inside every task, whatever the data."""
    value = conf(PYSPARK_MEMORY_CONF, None)
    if not value:
        return
    megabytes = _megabytes(value)
    if megabytes is not None and megabytes < MIN_PYSPARK_MEMORY_MB:
        raise ValueError(
            f"Expected {PYSPARK_MEMORY_CONF} unset or at least {MIN_PYSPARK_MEMORY_MB}m: Spark "
            "applies it as each Python worker's address-space limit, and TensorFlow alone maps "
            "about 1.4 GB, so every task would fail importing it. Unset it and bound memory "
            "with the executor's container (spark.executor.memoryOverhead), or raise it. "
            f"Received: {PYSPARK_MEMORY_CONF}={value}"
        )


def _megabytes(value: str) -> int | None:
    """A Spark memory string ("512m", "2g", "1024" = MiB) in MiB, or None if unreadable."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)b?\s*", value.lower())
    if match is None:
        return None
    number, unit = int(match.group(1)), match.group(2) or "m"
    return {"k": number // 1024, "m": number, "g": number * 1024, "t": number * 1024**2}[unit]


def task_slots(spark: SparkSession, wanted: int = 0) -> int:
    """The most tasks that can run at once (the limit for a barrier stage).

    Waits up to a short while for executors to register when fewer than ``wanted`` are there yet.
    A Spark Connect client cannot see the executors: beyond local masters it counts the slots
    the confs plan (:func:`planned_slots`), which :func:`check_workers` proves on the cluster.
    """
    local = _local(spark)
    if local is not None:
        return local
    if is_remote():
        return _planned(spark)
    deadline = time.monotonic() + _SLOT_WAIT_SECONDS
    slots = _jvm_slots(spark)
    if slots < wanted:
        # Executors register asynchronously; without a word this wait looks like a hang.
        logger.warning(
            "Waiting up to %.0f s for executors to register: %d of the %d task slots a sync "
            "fit needs are up",
            _SLOT_WAIT_SECONDS,
            slots,
            wanted,
        )
    while slots < wanted and time.monotonic() <= deadline:
        time.sleep(0.5)
        slots = _jvm_slots(spark)
    return slots


def check_workers(spark: SparkSession, mode: str, wanted: int | None) -> int:
    """numWorkers, or every task slot; a sync fit must fit in the slots all at once."""
    if wanted is not None and mode != "sync":
        return wanted  # ordinary stage: extra tasks queue for a free slot
    local = _local(spark)
    if local is None and is_remote():
        return _proven_workers(spark, mode, wanted)
    slots = local if local is not None else task_slots(spark, wanted or 0)
    if wanted is None:
        return slots
    if wanted > slots:
        waited = (
            ""
            if local is not None
            else f" (after waiting {_SLOT_WAIT_SECONDS:.0f} s for executors to register)"
        )
        raise ValueError(
            f"Expected `numWorkers` to be at most the cluster's {slots} task slots{waited}: a "
            "sync fit runs every worker at once in a barrier stage. Lower numWorkers or add "
            f"executors/cores. Received: numWorkers={wanted}"
        )
    return wanted


def _proven_workers(spark: SparkSession, mode: str, wanted: int | None) -> int:
    """Under Spark Connect beyond local masters: numWorkers, or the planned slots, once Spark
    has started a barrier stage that wide (the slot check the fit's own stage faces next)."""
    count = wanted if wanted is not None else _planned(spark)
    if mode != "sync" or barrier_starts(spark, count, _SLOT_WAIT_SECONDS):
        return count
    planned = planned_slots(master(spark), task_cpus(spark), spark.conf.get)
    slots = "" if planned is None else f"{planned} "
    raise ValueError(
        f"Expected `numWorkers` to be at most the cluster's {slots}task slots (a barrier stage "
        f"of {count} tasks did not start after waiting {_SLOT_WAIT_SECONDS:.0f} s for executors "
        "to register): a sync fit runs every worker at once in a barrier stage. Lower "
        f"numWorkers or add executors/cores. Received: numWorkers={wanted}"
    )


def _planned(spark: SparkSession) -> int:
    planned = planned_slots(master(spark), task_cpus(spark), spark.conf.get)
    if planned is None:
        raise ValueError(
            "Expected `numWorkers` to be set for a fit through Spark Connect on master "
            f"{master(spark)!r}: a Connect client cannot see the executors, and no conf gives "
            "their task slots (spark.executor.instances with spark.executor.cores, or "
            "spark.cores.max). Set numWorkers to at most its task slots. Received: numWorkers=None"
        )
    return planned


def _local(spark: SparkSession) -> int | None:
    """The task slots of a local master; None for any other."""
    url = master(spark)
    # local[*] is the cores of the machine Spark runs on: a Connect client may be on another.
    cores = _server_cores(spark) if is_remote() and url.startswith("local[*") else None
    return _local_slots(url, task_cpus(spark), cores)


def _local_slots(master_url: str, cpus: int, cores: int | None = None) -> int | None:
    if master_url == "local":
        return 1
    match = re.fullmatch(r"local\[(\d+|\*)(?:,\s*\d+)?\]", master_url)
    if match is None:
        return None
    count = (cores or os.cpu_count() or 1) if match.group(1) == "*" else int(match.group(1))
    return max(1, count // cpus)


def planned_slots(
    master_url: str, cpus: int, conf: Callable[[str, None], str | None]
) -> int | None:
    """The task slots a cluster's confs plan, where they say; None where only its executors
    could tell. ``conf`` reads a Spark setting (``spark.conf.get``)."""
    match = re.fullmatch(r"local-cluster\[\s*(\d+)\s*,\s*(\d+)\s*,\s*\d+\s*\]", master_url)
    if match is not None:
        return int(match.group(1)) * (int(match.group(2)) // cpus)

    def number(key: str) -> int:
        value = (conf(key, None) or "").strip()
        return int(value) if value.isdigit() else 0

    instances, cores = number("spark.executor.instances"), number("spark.executor.cores")
    if instances and cores and (conf("spark.dynamicAllocation.enabled", None) or "") != "true":
        return instances * (cores // cpus)
    cores_max = number("spark.cores.max")  # standalone: every core the application may take
    return cores_max // cpus if cores_max and master_url.startswith("spark://") else None


def _server_cores(spark: SparkSession) -> int:
    """The cores of the machine a local-mode Connect server runs on, asked of a task there."""

    def cores(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import pyarrow

        yield pyarrow.RecordBatch.from_pydict({"cores": [os.cpu_count() or 1]})

    row = spark.range(0, 1, 1, 1).mapInArrow(cores, "cores long").first()
    return int(row["cores"]) if row is not None else 1


def barrier_starts(spark: SparkSession, tasks: int, seconds: float) -> bool:
    """Whether Spark starts a barrier stage of ``tasks`` no-op tasks within ``seconds``.

    Spark refuses a barrier stage wider than the slots of the executors registered so far and
    retries every 15 s for minutes, so the probe runs in its own thread and is interrupted by
    its tag after ``seconds``. A probe failing otherwise says nothing of slots (the fit's own
    stage will report that failure)."""

    def drain(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        yield from (batch.slice(0, 0) for batch in batches)

    tag = f"spark_keras_ml-slots-{uuid.uuid4().hex}"

    def probe() -> None:
        with tagged_jobs(spark, tag), contextlib.suppress(Exception):
            spark.range(0, tasks, 1, tasks).mapInArrow(drain, "id long", barrier=True).collect()

    thread = threading.Thread(target=probe, name="spark_keras_ml-slot-probe", daemon=True)
    thread.start()
    thread.join(min(seconds, 5.0))
    if thread.is_alive():  # as on classic Spark: without a word this wait looks like a hang
        logger.warning("Waiting up to %.0f s for %d task slots to be free at once", seconds, tasks)
        thread.join(max(0.0, seconds - 5.0))
    if not thread.is_alive():
        return True
    cancel_jobs(spark, tag)
    thread.join(10.0)
    return False


def _jvm_slots(spark: SparkSession) -> int:
    """Slots of the registered executors, from the scheduler (classic Spark only)."""
    jsc = spark.sparkContext._jsc.sc()
    return int(jsc.maxNumConcurrentTasks(jsc.resourceProfileManager().defaultResourceProfile()))


@contextlib.contextmanager
def tagged_jobs(spark: SparkSession, tag: str, description: str = "") -> Iterator[None]:
    """Tag the Spark jobs this thread starts, so that :func:`cancel_jobs` can stop them, and
    give them ``description`` (what the Spark UI shows for the job)."""
    if is_remote():
        spark.addTag(tag)
        try:
            yield
        finally:
            spark.removeTag(tag)
        return
    # Classic Spark: SparkSession.interruptTag does not reach jobs started from Python threads,
    # SparkContext job tags do. Interrupting on cancel also kills a stuck Python worker.
    sc = spark.sparkContext
    interrupt, describe = "spark.job.interruptOnCancel", "spark.job.description"
    previous = {key: sc.getLocalProperty(key) for key in (interrupt, describe)}
    sc.addJobTag(tag)
    sc.setLocalProperty(interrupt, "true")
    if description:
        sc.setJobDescription(description)
    try:
        yield
    finally:
        sc.removeJobTag(tag)
        for key, value in previous.items():
            sc.setLocalProperty(key, value)  # type: ignore[arg-type]


def cancel_jobs(spark: SparkSession, tag: str) -> None:
    """Cancel every job tagged by :func:`tagged_jobs`; safe from any thread."""
    if is_remote():
        spark.interruptTag(tag)
    else:
        spark.sparkContext.cancelJobsWithTag(tag)
