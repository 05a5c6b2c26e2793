"""The GPUs Spark gave a task, made the only ones its Keras backend sees (executor side).

Spark assigns GPUs per task (``spark.task.resource.gpu.amount``) but only tells the task their
addresses: every backend would still open every GPU of the machine, TensorFlow and JAX each
taking most of a GPU's memory up front. :func:`select_gpus` runs in the Python worker before the
backend's first import in the process and sets ``CUDA_VISIBLE_DEVICES`` to the task's GPUs,
memory growth instead of preallocation, and, where several tasks share a GPU (an amount below
1), a memory cap per task; :func:`after_import` applies what only the imported backend can set.

Spark's addresses are positions among the GPUs the executor process sees: where the executor's
environment already sets ``CUDA_VISIBLE_DEVICES`` (a container, a scheduler), address ``1`` is
its second entry (:func:`visible_devices`). CUDA reads ``CUDA_VISIBLE_DEVICES`` once per
process, so a reused Python worker (Spark's default) cannot follow a later task to other GPUs:
that is a clear error naming ``spark.python.worker.reuse=false``, not a task on another task's
GPU. No Keras, TensorFlow, JAX or torch at import: this runs before them.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import sys

logger = logging.getLogger(__name__)

#: The environment variable CUDA reads, once per process, for the devices the process sees.
VISIBLE = "CUDA_VISIBLE_DEVICES"
#: TensorFlow allocates as it needs instead of nearly all of a GPU at its first operation. Set on
#: every backend: Keras imports TensorFlow whenever it is installed.
TF_GROWTH = "TF_FORCE_GPU_ALLOW_GROWTH"
#: JAX preallocates 75 % of each GPU it sees unless told not to.
JAX_PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE"
#: The share of a GPU's memory JAX's allocator may use (a cap, also without preallocation).
JAX_FRACTION = "XLA_PYTHON_CLIENT_MEM_FRACTION"
#: Every variable this module sets. A value the executor's environment already had is the
#: user's and is kept (CUDA_VISIBLE_DEVICES is mapped through instead).
MANAGED = (VISIBLE, TF_GROWTH, JAX_PREALLOCATE, JAX_FRACTION)

#: The module each backend imports: once it is loaded, its devices are fixed for the process.
BACKEND_MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}

#: Of a shared GPU's memory, the part of a task's share left outside its allocator: a CUDA
#: context and the libraries' workspaces live there (about 0.3 to 0.5 GB per process).
HEADROOM = 0.1
#: What a CUDA context and the math libraries take beside the allocator, where the GPU's size is
#: known (the headroom is at least this much of it).
CONTEXT_BYTES = 512 * 1024**2

#: The executor's own values of :data:`MANAGED`, read before this process first changed them
#: (Spark reuses a Python worker, whose environment then holds an earlier task's choice).
_inherited: dict[str, str | None] | None = None
#: The CUDA_VISIBLE_DEVICES this process's backend is initialised with: the last selection
#: before the backend's import, which fixes it.
_initialised: str | None = None


def task_gpus() -> list[str]:
    """The GPU addresses Spark gave the running task; empty outside a task or without GPUs."""
    from pyspark import TaskContext

    context = TaskContext.get()
    if context is None:
        return []
    info = context.resources().get("gpu")
    return list(info.addresses) if info is not None else []


def visible_devices(addresses: list[str], inherited: str | None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` naming ``addresses``, Spark's GPU addresses for a task.

    Each address is a position among the devices the executor process sees, so where the
    executor already had ``CUDA_VISIBLE_DEVICES`` (``inherited``: "2,3", or UUIDs) address "1"
    is its second entry. An address that is a GPU's UUID ("GPU-…", "MIG-…") names it directly.
    """
    entries = None if inherited is None else [e.strip() for e in inherited.split(",") if e.strip()]
    devices = []
    for raw in addresses:
        address = raw.strip()
        if address.startswith(("GPU-", "MIG-")):  # a UUID: the same device in any numbering
            if entries is not None and address not in entries:
                raise _bad_address(raw, addresses, inherited, "is not among them")
            devices.append(address)
            continue
        try:
            index = int(address)
        except ValueError:
            raise _bad_address(raw, addresses, inherited, "is not a device index") from None
        if index < 0 or (entries is not None and index >= len(entries)):
            raise _bad_address(raw, addresses, inherited, "is out of range")
        devices.append(str(index) if entries is None else entries[index])
    return ",".join(devices)


def _bad_address(address: str, addresses: list[str], inherited: str | None, why: str) -> ValueError:
    if inherited is None:
        sees = "every GPU of its machine (CUDA_VISIBLE_DEVICES unset)"
        todo = "Make it report device indices (0, 1, …, as nvidia-smi numbers them) or UUIDs."
    elif not any(e.strip() for e in inherited.split(",")):
        sees = f"none: CUDA_VISIBLE_DEVICES={inherited!r}"
        todo = "Unset CUDA_VISIBLE_DEVICES in the executors' environment."
    else:
        count = len([e for e in inherited.split(",") if e.strip()])
        sees = f"CUDA_VISIBLE_DEVICES={inherited!r}, positions 0 to {count - 1}"
        todo = (
            f"Make it report positions 0 to {count - 1} in that list or UUIDs among them, or "
            "unset CUDA_VISIBLE_DEVICES in the executors' environment."
        )
    return ValueError(
        "Expected each GPU address Spark gave the task to be a position among the devices the "
        f"executor sees ({sees}) or a GPU UUID: CUDA numbers a process's devices from 0. The "
        "addresses come from the GPU discovery script (spark.executor.resource.gpu."
        f"discoveryScript, or spark.worker.resource.gpu.discoveryScript). {todo} Received: "
        f"address {address!r} ({why}) of {addresses}"
    )


def tasks_per_gpu(amount: float) -> int:
    """How many tasks Spark runs on one GPU at ``amount`` per task: ⌊1 / amount⌋ below 1, as
    Spark counts them (``ResourceUtils.calculateAmountAndPartsForFraction``)."""
    return math.floor(1.0 / amount) if amount < 1 else 1


def memory_fraction(amount: float | None, total_bytes: int | None = None) -> float | None:
    """The share of its GPU's memory a task may allocate, where several tasks share the GPU
    (``amount`` below 1); None for whole GPUs.

    Each of the ⌊1 / amount⌋ tasks on a GPU gets an equal share less :data:`HEADROOM` of it,
    and at least :data:`CONTEXT_BYTES` less where the GPU's size is known: the caps count the
    allocators' memory only, and every process's CUDA context comes on top.
    """
    if amount is None or amount >= 1:
        return None
    share = 1.0 / tasks_per_gpu(amount)
    headroom = share * HEADROOM
    if total_bytes:
        headroom = max(headroom, CONTEXT_BYTES / total_bytes)
    # Never below half a share: on a GPU too small for its contexts the task fails for memory
    # either way, and a tiny cap would only move where.
    return round(max(share - headroom, share / 2), 4)


def select_gpus(backend: str, amount: float | None) -> list[str]:
    """Give the running task's GPUs to ``backend``, before its first import in this process.

    Without GPUs for the task nothing changes. Otherwise ``CUDA_VISIBLE_DEVICES`` names just the
    task's GPUs, and the backend grows its memory as needed (capped per task where ``amount``
    shares a GPU). Returns the devices now in ``CUDA_VISIBLE_DEVICES``.
    """
    return assign_gpus(task_gpus(), backend, amount)


def assign_gpus(addresses: list[str], backend: str, amount: float | None) -> list[str]:
    """:func:`select_gpus` for the given addresses (what a task of Spark's was given)."""
    global _inherited, _initialised
    if not addresses:
        return []
    if _inherited is None:
        _inherited = {name: os.environ.get(name) for name in MANAGED}
    inherited = _inherited
    value = visible_devices(addresses, inherited[VISIBLE])
    module = BACKEND_MODULES.get(backend)
    if module is not None and module in sys.modules:
        # Imported: its devices were fixed by the last selection before, or by the executor's
        # own environment where nothing selected any (None: every GPU of the machine).
        initialised = _initialised if _initialised is not None else inherited[VISIBLE]
        if initialised != value:
            raise _moved(backend, initialised, value)
    else:
        _initialised = value
    os.environ[VISIBLE] = value
    # JAX's cap is a share of the GPU, read at its start: the GPU's size, which would tell how
    # much a CUDA context takes of it, is unknown before a CUDA import.
    fraction = memory_fraction(amount)
    defaults: dict[str, str | None] = {TF_GROWTH: "true"}
    if backend == "jax":
        defaults[JAX_PREALLOCATE] = "false"
        defaults[JAX_FRACTION] = None if fraction is None else f"{fraction:g}"
    for name, default in defaults.items():
        if inherited[name] is not None:  # the user's, from the executor's environment
            continue
        if default is None:
            os.environ.pop(name, None)  # an earlier task's cap in this reused worker
        else:
            os.environ[name] = default
    logger.info(
        "Task GPUs %s (CUDA_VISIBLE_DEVICES=%s)%s",
        ",".join(addresses),
        value,
        "" if fraction is None else f", shared: about {fraction:.0%} of a GPU's memory each",
    )
    return value.split(",")


def _moved(backend: str, initialised: str | None, value: str) -> RuntimeError:
    before = "every GPU of its machine" if initialised is None else repr(initialised)
    return RuntimeError(
        f"Expected this Python worker's task to get the GPUs its {backend} backend started on "
        f"({VISIBLE}={before}): Spark reuses a Python worker for later tasks, and a CUDA "
        "context cannot move to other devices. Set spark.python.worker.reuse=false when "
        "executors have several GPUs (spark.executor.resource.gpu.amount above the task's "
        f"amount). Received: {VISIBLE}={value!r} for this task (pid {os.getpid()})"
    )


def after_import(backend: str, amount: float | None) -> None:
    """What only the imported backend can set, after :func:`select_gpus` and its import: a
    no-op without GPUs for the task, or where the backend sees none (its CPU build)."""
    if task_gpus():
        configure_backend(backend, amount)


def configure_backend(backend: str, amount: float | None) -> None:
    """:func:`after_import` for a task that has GPUs."""
    if "tensorflow" in sys.modules:  # Keras imports it on every backend where it is installed
        _configure_tensorflow(amount, own=backend == "tensorflow")
    if backend == "torch":
        _configure_torch(amount)
    # JAX reads its environment (select_gpus) when it starts its GPU client: nothing to add.


def _configure_tensorflow(amount: float | None, own: bool) -> None:
    """Memory growth, or a cap where the GPU is shared, for TensorFlow as the backend; no GPU
    at all where it only serves another backend (tf.data, serialization), so that it takes no
    memory of theirs. Each applies until TensorFlow's runtime starts: a reused worker's later
    tasks find them set (RuntimeError, or ValueError for growth beside a cap)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return
    try:
        if not own:
            tf.config.set_visible_devices([], "GPU")
            return
        total = _total_bytes()
        fraction = memory_fraction(amount, total)
        if fraction is not None and total is not None:
            # A logical device's limit caps the allocator; TF_FORCE_GPU_ALLOW_GROWTH still
            # makes it grow up to there instead of taking it all at once.
            limit = int(fraction * total / 1024**2)
            for gpu in gpus:
                tf.config.set_logical_device_configuration(
                    gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=limit)]
                )
            return
        if fraction is not None:
            # No GPU size to cap by (no libcuda to ask): memory growth alone keeps the tasks
            # sharing this GPU to what each uses, with no bound on any one of them.
            logger.warning("No memory cap for TensorFlow on a shared GPU: its size is unknown")
        if os.environ.get(TF_GROWTH, "true").strip().lower() == "true":
            for gpu in gpus:
                tf.config.experimental.set_memory_growth(gpu, True)
    except (RuntimeError, ValueError):  # configured already, by an earlier task of this worker
        logger.debug("TensorFlow's GPUs were configured already", exc_info=True)


def _configure_torch(amount: float | None) -> None:
    import torch

    if not torch.cuda.is_available():  # the CPU build, or no device visible
        return
    torch.cuda.set_device(0)  # the task's first GPU: the only ones visible are the task's
    fraction = memory_fraction(amount, torch.cuda.get_device_properties(0).total_memory)
    if fraction is not None:
        torch.cuda.set_per_process_memory_fraction(fraction, 0)


def _total_bytes() -> int | None:
    """The memory of the first GPU in ``CUDA_VISIBLE_DEVICES``, from the CUDA driver (no context
    is created); None where there is no driver or device."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device, total = ctypes.c_int(), ctypes.c_size_t()
    try:
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(device), 0) != 0:
            return None
        if cuda.cuDeviceTotalMem_v2(ctypes.byref(total), device) != 0:
            return None
    except AttributeError:  # a driver without these symbols
        return None
    return int(total.value)


def _forget_process() -> None:
    """Start this process's record over, as a fresh Python worker (for tests)."""
    global _inherited, _initialised
    _inherited, _initialised = None, None
