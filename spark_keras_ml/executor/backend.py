"""The Keras backend a Python worker imports, and what it may use of the machine (executor side).

:func:`prepare_backend` runs at the start of every training and inference task, before the
task's first Keras import: it sets ``KERAS_BACKEND`` to the driver's backend (carried in the
task's config), gives the task's GPUs to it, and keeps each backend's CPU threads to the task's
share (``spark.task.cpus``), which most of them size once, at import. Spark reuses a Python
worker for later tasks, so a worker that already imported Keras under another backend (a task
of another application sharing the executor's workers, or of a driver that changed backends)
cannot switch: that is a clear error, not a fit on the wrong backend. No Keras at import.

It then imports Keras itself, leaving out the packages Keras' own import reaches only for what a
task never does (:data:`NOT_FOR_TASKS`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator

from spark_keras_ml.config import BACKENDS, EXTRAS
from spark_keras_ml.executor import gpus
from spark_keras_ml.executor.resources import limit_malloc_arenas
from spark_keras_ml.quiet import import_tensorflow, quiet_environment

#: XLA's flags for a single CPU thread: JAX has no setting for a thread count, and XLA's CPU
#: client otherwise starts one thread per core in every task.
JAX_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

#: What Keras' import tries to import for its scikit-learn wrappers (``keras.wrappers``), its
#: image-gallery plots (``keras.visualization``) and its notebook view of a saved archive
#: (``keras.saving.KerasFileEditor``), and uses for nothing else. Where they are installed, as on
#: most clusters' images, they cost every Python worker's Keras import about 2 CPU-seconds of
#: its 7.3 here (scikit-learn brings SciPy): Keras finds them missing instead, and they import as
#: usual once Keras is in.
NOT_FOR_TASKS = ("sklearn", "matplotlib", "IPython")


def prepare_backend(backend: str, cpus: int, gpu_amount: float | None = None) -> None:
    """Make this Python worker import Keras under ``backend``, on the task's GPUs (if Spark gave
    it any) and with ``cpus`` threads per pool, before Keras is first imported here."""
    quiet_environment()
    limit_malloc_arenas()
    check_imported(backend)
    os.environ["KERAS_BACKEND"] = backend
    gpus.select_gpus(backend, gpu_amount)  # CUDA_VISIBLE_DEVICES: read at the backend's import
    with leaving_out(NOT_FOR_TASKS):
        # Keras imports TensorFlow whenever it is installed, on any backend (its serialization
        # asks whether an object is a TensorFlow type), so its threads are sized on every one;
        # TensorFlow's import imports Keras.
        if backend == "tensorflow" or importlib.util.find_spec("tensorflow") is not None:
            _tensorflow_threads(cpus)
        if backend == "jax":
            _jax_threads(cpus)
        elif backend == "torch":
            _torch_threads(cpus)
        gpus.after_import(backend, gpu_amount)
        import keras  # noqa: F401


@contextlib.contextmanager
def leaving_out(names: tuple[str, ...]) -> Iterator[None]:
    """Make imports of ``names`` fail inside the block (where this process has not imported
    them yet), as if they were not installed; after it, they import as usual."""
    # A None entry in sys.modules makes an import of that name raise ImportError.
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def check_imported(backend: str) -> None:
    """Raise when this process imported Keras under another backend already (Keras picks it
    once, at import), or cannot import ``backend`` at all."""
    if "keras" in sys.modules:
        import keras

        loaded = keras.backend.backend()
        if loaded != backend:
            raise RuntimeError(
                f"Expected this Python worker to run Keras on the driver's backend {backend!r}. "
                f"It imported Keras on {loaded!r} for an earlier task, and Keras cannot change "
                f"backend in a process: use one backend per Spark application, or set "
                f"spark.python.worker.reuse=false. Received: a reused worker on {loaded!r} "
                f"(pid {os.getpid()})"
            )
        return
    module = BACKENDS[backend]
    if importlib.util.find_spec(module) is None:
        raise RuntimeError(
            f"Expected the Keras backend {backend!r} (the driver's) to be installed in this "
            f"executor's Python. Install it there (pip install 'spark_keras_ml{EXTRAS[backend]}')"
            f" or run the driver on a backend the executors have. Received: no module "
            f"{module!r} in {sys.executable}"
        )


def _tensorflow_threads(cpus: int) -> None:
    import_tensorflow()
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(cpus)
        tf.config.threading.set_inter_op_parallelism_threads(cpus)
    except RuntimeError:  # already initialised by an earlier task in this reused worker
        pass


def _jax_threads(cpus: int) -> None:
    """One thread where the task has one core (XLA reads its flags when JAX starts its CPU
    client, at the first computation); with more, XLA's own pool, which no flag sizes."""
    flags = os.environ.get("XLA_FLAGS", "")
    if cpus == 1 and "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {JAX_ONE_THREAD}".strip()


def _torch_threads(cpus: int) -> None:
    import torch

    torch.set_num_threads(cpus)
    try:
        torch.set_num_interop_threads(cpus)
    except RuntimeError:  # set once per process, before any parallel work: a reused worker's
        pass
