"""Keras models as ``.keras`` archive bytes: the only form a model takes in Params, closures and
saved artifacts (never pickle, never a live object shared between threads).

Importing this module does not import Keras; the functions do, so executors can set TensorFlow's
thread pools before the first import.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import socket
import tempfile
import zipfile
from collections.abc import Sequence
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


def import_custom_objects(modules: Sequence[str]) -> None:
    """Import the modules that register the model's custom objects, naming any that fail."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ImportError(
                f"Expected module `{name}` (from customObjects) to be importable here "
                f"({socket.gethostname()}, pid {os.getpid()}). Install it on every executor or "
                f"ship it with SparkContext.addPyFile. Received: {exc}"
            ) from exc


def model_from_bytes(
    data: bytes, *, compile: bool = False, custom_objects: Sequence[str] = ()
) -> keras.Model:
    """Rebuild a model from :func:`model_to_bytes` output, with Keras' ``safe_mode`` on.

    With ``compile=True`` the model is compiled from the archive's compile config but its saved
    optimizer state is not restored: training state belongs to a fit, not to the model.
    """
    import keras

    import_custom_objects(custom_objects)
    with tempfile.TemporaryDirectory(prefix="skml-") as tmp:
        path = os.path.join(tmp, "model.keras")
        with open(path, "wb") as f:
            f.write(data)
        try:
            model = keras.saving.load_model(path, compile=False, safe_mode=True)
        except (TypeError, ValueError) as exc:
            custom = custom_names(data)
            if not custom and "locate" not in str(exc) and "Unknown" not in str(exc):
                raise
            listed = ", ".join(custom) or "none found"
            raise ValueError(
                f"Expected the model's custom objects ({listed}) to be registered here "
                f"({socket.gethostname()}): list the modules that register them "
                "(keras.saving.register_keras_serializable) in customObjects, and install them "
                "on every executor or ship them with SparkContext.addPyFile. "
                f"Received: {str(exc).splitlines()[0][:300]}"
            ) from exc
    config = compile_config_of(data)
    if compile and config:
        model.compile_from_config(config)
    return model


def custom_names(data: bytes) -> list[str]:
    """Registered names ("package>Name") of the custom classes and functions in an archive."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        config = json.loads(archive.read("config.json"))
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            names = [node.get("registered_name")]
            if node.get("class_name") == "function":
                names.append(node.get("config"))
            for name in names:
                if isinstance(name, str) and ">" in name and name not in found:
                    found.append(name)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return found


def compile_config_of(data: bytes) -> dict[str, Any] | None:
    """The compile config stored in a ``.keras`` archive, or None for an uncompiled model."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        config = json.loads(archive.read("config.json"))
    return config.get("compile_config") or None


def model_id(data: bytes) -> str:
    """A stable id for cached copies of a model on executors."""
    return hashlib.sha256(data).hexdigest()[:32]
