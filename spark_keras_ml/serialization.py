"""Keras models as ``.keras`` archive bytes: the only form a model takes in Params, closures and
saved artifacts (never pickle, never a live object shared between threads).

Importing this module does not import Keras; the functions do, so executors can set TensorFlow's
thread pools before the first import.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras


def model_to_bytes(model: keras.Model) -> bytes:
    """The model's ``.keras`` archive (architecture, weights, compile config) as bytes."""
    with tempfile.TemporaryDirectory(prefix="skml-") as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        with open(path, "rb") as f:
            return f.read()


def model_from_bytes(data: bytes, *, compile: bool = False) -> keras.Model:
    """Rebuild a model from :func:`model_to_bytes` output, with Keras' ``safe_mode`` on.

    With ``compile=True`` the model is compiled from the archive's compile config but its saved
    optimizer state is not restored: training state belongs to a fit, not to the model.
    """
    import keras

    with tempfile.TemporaryDirectory(prefix="skml-") as tmp:
        path = os.path.join(tmp, "model.keras")
        with open(path, "wb") as f:
            f.write(data)
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    config = compile_config_of(data)
    if compile and config:
        model.compile_from_config(config)
    return model


def compile_config_of(data: bytes) -> dict[str, Any] | None:
    """The compile config stored in a ``.keras`` archive, or None for an uncompiled model."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        config = json.loads(archive.read("config.json"))
    return config.get("compile_config") or None


def model_id(data: bytes) -> str:
    """A stable id for cached copies of a model on executors."""
    return hashlib.sha256(data).hexdigest()[:32]


def is_keras_model(value: Any) -> bool:
    try:
        import keras
    except ImportError:  # pragma: no cover - keras is a hard dependency
        return False
    return isinstance(value, keras.Model)
