"""Task slots and job tags for a Spark Connect client, which has no JVM to ask."""

from __future__ import annotations

import os
import threading
import time

import pytest

from spark_keras_ml import cluster

pytestmark = pytest.mark.connect


def test_a_local_master_counts_its_slots_and_says_when_numworkers_is_too_many(spark) -> None:  # type: ignore[no-untyped-def]
    assert cluster.task_cpus(spark) == 1
    assert cluster.task_slots(spark) == 2
    # local[*] counts the server's cores, asked of a task (this server runs on this machine).
    assert cluster._server_cores(spark) == os.cpu_count()
    assert cluster.check_workers(spark, "sync", None) == 2
    assert cluster.check_workers(spark, "async", 5) == 5  # extra tasks queue
    with pytest.raises(ValueError, match=r"at most the cluster's 2 task slots: a sync .*=3$"):
        cluster.check_workers(spark, "sync", 3)


def test_a_barrier_probe_starts_when_the_slots_are_there_and_is_cancelled_otherwise(  # type: ignore[no-untyped-def]
    spark, caplog
) -> None:
    assert cluster.barrier_starts(spark, 2, 30.0)
    started = time.monotonic()
    assert not cluster.barrier_starts(spark, 3, 6.0)
    assert time.monotonic() - started < 20  # Spark alone would retry it for ten minutes
    assert "Waiting up to 6 s for 3 task slots" in caplog.text
    assert cluster.barrier_starts(spark, 2, 30.0)  # nothing of the cancelled probe holds a slot


@pytest.mark.parametrize(
    ("master", "cpus", "conf", "slots"),
    [
        ("local-cluster[2,1,1024]", 1, {}, 2),
        ("local-cluster[3, 4, 2048]", 2, {}, 6),
        ("yarn", 2, {"spark.executor.instances": "3", "spark.executor.cores": "4"}, 6),
        ("k8s://h:443", 1, {"spark.executor.instances": "3"}, None),
        (
            "yarn",
            1,
            {
                "spark.executor.instances": "3",
                "spark.executor.cores": "4",
                "spark.dynamicAllocation.enabled": "true",
            },
            None,
        ),
        ("spark://h:7077", 2, {"spark.cores.max": "8"}, 4),
        ("spark://h:7077", 1, {}, None),
        ("yarn", 1, {"spark.cores.max": "8"}, None),
    ],
)
def test_planned_slots_come_from_the_master_and_confs(master, cpus, conf, slots) -> None:  # type: ignore[no-untyped-def]
    assert cluster.planned_slots(master, cpus, lambda key, default: conf.get(key, default)) == slots


def test_tagged_jobs_are_cancelled_from_another_thread(spark) -> None:  # type: ignore[no-untyped-def]
    def sleep(batches):  # type: ignore[no-untyped-def]
        import time

        time.sleep(120)
        yield from batches

    failed: list[BaseException] = []

    def run() -> None:
        with cluster.tagged_jobs(spark, "skml-test-cancel", "a job to cancel"):
            try:
                spark.range(0, 2, 1, 2).mapInArrow(sleep, "id long").collect()
            except Exception as exc:
                failed.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    time.sleep(3)  # the job is running
    cluster.cancel_jobs(spark, "skml-test-cancel")
    thread.join(60)
    assert not thread.is_alive() and time.monotonic() - started < 60
    assert failed and "cancel" in str(failed[0]).lower()
    assert spark.getTags() == set()  # this thread's tags: the other thread's were its own
