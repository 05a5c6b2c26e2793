"""The GPUs a fit's tasks ask Spark for, checked before any job (driver side).

A task's GPUs are Spark's to assign: ``spark.task.resource.gpu.amount`` per task, from the
``spark.executor.resource.gpu.amount`` each executor has. Each worker then keeps to the GPUs of
its task (:mod:`spark_keras_ml.executor.gpus`). :func:`check_gpu_amount` refuses, before the
training job, what would otherwise fail inside it, or hang: an amount Spark cannot schedule, a
sync fit with more workers than the executors' GPUs run at once, and reused Python workers that
Spark may hand other GPUs than their backend started on.

Fractional amounts work: at 1/n (0.5, 0.25, …) Spark runs n tasks on each GPU, and each task's
backend caps its memory at a little under 1/n of the GPU. Spark itself accepts any amount up to
0.5 and runs ⌊1 / amount⌋ tasks per GPU, so 0.4 would run two, each believing it has 40 %: such
amounts are refused for one that says what Spark does. No Keras at import.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

#: Reads a Spark setting with a default, as ``spark.conf.get`` does.
ConfGet = Callable[[str, str | None], str | None]

TASK_GPU_CONF = "spark.task.resource.gpu.amount"
EXECUTOR_GPU_CONF = "spark.executor.resource.gpu.amount"
REUSE_CONF = "spark.python.worker.reuse"

#: How close to 1/n a fraction must be: 0.33 and 0.333 mean a third (Spark: 3 tasks per GPU).
_ONE_OVER_N_TOLERANCE = 0.01


def task_gpu_amount(conf_get: ConfGet) -> float | None:
    """``spark.task.resource.gpu.amount`` as a number; None where unset (tasks get no GPUs)."""
    value, amount = _conf_number(conf_get, TASK_GPU_CONF)
    if amount is None:
        return None
    if not math.isfinite(amount) or amount <= 0:
        raise ValueError(
            f"Expected {TASK_GPU_CONF} to be a positive number: the GPUs (or share of one) each "
            "task gets. Set it to a whole number, or to 1/n (0.5, 0.25, …) for n tasks per "
            f"GPU, or unset it for tasks without GPUs. Received: {TASK_GPU_CONF}={value!r}"
        )
    return amount


def tasks_per_gpu(amount: float) -> int:
    """How many tasks Spark runs on one GPU at ``amount`` per task: ⌊1 / amount⌋ below 1 (as
    Spark's ``ResourceUtils.calculateAmountAndPartsForFraction`` counts them), else 1."""
    return math.floor(1.0 / amount) if amount < 1 else 1


def check_gpu_amount(
    conf_get: ConfGet, workers: int | None = None, executors: int | None = None
) -> float | None:
    """The task GPU amount of a fit, refused up front where Spark cannot run it as planned.

    ``workers``: the tasks that must run at once (a sync fit's numWorkers; None where extra
    tasks may wait for a free GPU). ``executors``: how many there are, where the caller knows;
    else read from the confs (``local-cluster[N,…]``, or ``spark.executor.instances`` without
    dynamic allocation), and the check that needs it is skipped where they do not say.
    Returns the amount, None where tasks get no GPUs.
    """
    amount = task_gpu_amount(conf_get)
    if amount is None:
        return None
    _check_fraction(amount)
    per_executor = _executor_gpus(conf_get)
    if per_executor is None:
        return amount
    if amount > per_executor:
        raise ValueError(
            f"Expected {TASK_GPU_CONF} to be at most {EXECUTOR_GPU_CONF} ({per_executor:g}): "
            "a task's GPUs come from one executor, so no executor could run it. Lower the "
            f"task's amount or raise the executors'. Received: {TASK_GPU_CONF}={amount:g}"
        )
    _check_reuse(conf_get, amount, per_executor)
    count = executors if executors is not None else _executor_count(conf_get)
    if workers is not None and count is not None:
        # As Spark counts an executor's slots for a resource: whole GPUs per task, or n tasks
        # on each GPU at 1/n.
        slots = count * int(per_executor * tasks_per_gpu(amount) // math.ceil(amount))
        if workers > slots:
            gpu = f"{per_executor:g} GPU" + ("s" if per_executor > 1 else "")
            raise ValueError(
                f"Expected `numWorkers` to be at most the {slots} tasks the executors' GPUs run "
                f"at once ({count} executors × {gpu}, {amount:g} per task): a sync fit runs "
                "every worker at once, and the rest would wait forever. Lower numWorkers, raise "
                f"{EXECUTOR_GPU_CONF} or the executors (spark.executor.instances), or lower "
                f"{TASK_GPU_CONF} (0.5 runs two tasks on each GPU). Received: "
                f"numWorkers={workers}"
            )
    return amount


def _check_fraction(amount: float) -> None:
    """Spark's rule (``ResourceProfile.validate``: at most 0.5, or whole), and 1/n below 1."""
    if amount > 0.5 and amount != math.floor(amount):
        raise ValueError(
            f"Expected {TASK_GPU_CONF} to be a whole number, or at most 0.5: Spark runs whole "
            "GPUs per task, or several tasks on one GPU. Set a whole number, or 0.5 for two "
            f"tasks per GPU. Received: {TASK_GPU_CONF}={amount:g}"
        )
    if amount < 1:
        n = tasks_per_gpu(amount)
        if amount * n < 1 - _ONE_OVER_N_TOLERANCE:
            raise ValueError(
                f"Expected {TASK_GPU_CONF} below 1 to be 1/n (0.5, 0.3333, 0.25, …): Spark "
                f"runs ⌊1 / amount⌋ = {n} tasks on each GPU, each with 1/{n} of it, not "
                f"{amount:g}. Set {1 / n:.4g} for {n} tasks per GPU, or {1 / (n + 1):.4g} for "
                f"{n + 1}. Received: {TASK_GPU_CONF}={amount:g}"
            )


def _check_reuse(conf_get: ConfGet, amount: float, per_executor: float) -> None:
    """A reused Python worker may get other GPUs than its backend started on, wherever an
    executor has more GPUs than one task takes; CUDA cannot move it, so the task would fail."""
    reuse = (conf_get(REUSE_CONF, None) or "true").strip().lower()
    if reuse != "false" and per_executor > math.ceil(amount):
        raise ValueError(
            f"Expected {REUSE_CONF}=false where an executor has more GPUs than a task takes "
            f"({EXECUTOR_GPU_CONF}={per_executor:g}, {TASK_GPU_CONF}={amount:g}): Spark reuses "
            "a Python worker for later tasks and may give it other GPUs, while its Keras "
            "backend's CUDA context stays on those of its first task. Set "
            f"{REUSE_CONF}=false, or give each executor the GPUs of one task. Received: "
            f"{REUSE_CONF}={reuse}" + (" (Spark's default)" if reuse == "true" else "")
        )


def _executor_gpus(conf_get: ConfGet) -> float | None:
    value, amount = _conf_number(conf_get, EXECUTOR_GPU_CONF)
    if amount is None:
        return None
    if not math.isfinite(amount) or amount < 1 or amount != math.floor(amount):
        raise ValueError(
            f"Expected {EXECUTOR_GPU_CONF} to be a whole number of GPUs, at least 1: what "
            f"each executor has, shared out to its tasks by {TASK_GPU_CONF}. Set it to the "
            f"GPUs of one executor. Received: {EXECUTOR_GPU_CONF}={value!r}"
        )
    return amount


def _conf_number(conf_get: ConfGet, key: str) -> tuple[str, float | None]:
    """A conf's text and its number (NaN where it is not one); None where it is unset."""
    value = (conf_get(key, None) or "").strip()
    if not value:
        return value, None
    try:
        return value, float(value)
    except ValueError:
        return value, math.nan


def _executor_count(conf_get: ConfGet) -> int | None:
    """The executors the confs plan; None where only the cluster could tell."""
    master = conf_get("spark.master", None) or ""
    match = re.fullmatch(r"local-cluster\[\s*(\d+)\s*,\s*\d+\s*,\s*\d+\s*\]", master)
    if match is not None:
        return int(match.group(1))
    instances = (conf_get("spark.executor.instances", None) or "").strip()
    dynamic = (conf_get("spark.dynamicAllocation.enabled", None) or "").strip().lower()
    return int(instances) if instances.isdigit() and dynamic != "true" else None
