"""TensorFlow's logging environment, on the driver and in every Python worker.

Each Python worker that imports TensorFlow printed its banners (oneDNN, CPU instructions, absl's
note on logging before ``InitializeLog``): a dozen lines per fit that say nothing about it.
:func:`import_tensorflow` sets ``TF_CPP_MIN_LOG_LEVEL`` (unless the user set it) before the first
import, and filters the few banner lines TensorFlow prints through absl before that level
applies. No Keras or TensorFlow at import: this runs before them.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

#: Set where the user has not: "1" hides TensorFlow's C++ INFO lines (the banners) and keeps its
#: warnings and errors.
QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "1"}

#: INFO banners TensorFlow's import writes to the process's stderr before its log level takes
#: effect (absl logs them before ``InitializeLog``), whatever ``TF_CPP_MIN_LOG_LEVEL`` says.
BANNERS = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|oneDNN custom operations are on"
    r"|cpu_feature_guard\.cc"
    r"|To enable the following instructions:"
)


def quiet_environment() -> None:
    """Set the quiet defaults in ``os.environ``, keeping any the user already set."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def wants_banners() -> bool:
    """A user who asked for TensorFlow's INFO lines (``TF_CPP_MIN_LOG_LEVEL=0``) gets them."""
    return os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0").strip() in ("", "0")


def import_tensorflow() -> None:
    """Import TensorFlow once in this process, without its banners."""
    quiet_environment()
    if "tensorflow" in sys.modules:
        return
    with filtered_stderr(None if wants_banners() else BANNERS):
        import tensorflow  # noqa: F401


@contextlib.contextmanager
def filtered_stderr(drop: re.Pattern[str] | None) -> Iterator[None]:
    """Hold what is written to file descriptor 2 (C++ code writes there, not to
    ``sys.stderr``) and write it back on leaving, less the lines ``drop`` matches.

    A file, not a pipe: a pipe nobody reads would block a writer once full.
    """
    if drop is None:
        yield
        return
    sys.stderr.flush()
    with tempfile.TemporaryFile() as held:
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held if not drop.search(line.decode(errors="replace"))]
            if kept:
                os.write(2, b"".join(kept))
