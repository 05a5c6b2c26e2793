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
                "ship it with SparkContext.addPyFile (through Spark Connect: "
                f"SparkSession.addArtifacts(path, pyfile=True)). Received: {exc}"
            ) from exc


def model_from_bytes(
    data: bytes, *, compile: bool = False, custom_objects: Sequence[str] = ()
) -> keras.Model:
    """Rebuild a model from :func:`model_to_bytes` output, with Keras' ``safe_mode`` on.

    With ``compile=True`` the model is compiled from the archive's compile config but its saved
    optimizer state is not restored: training state belongs to a fit, not to the model.
    """
    import keras

    archive_config(data)  # bytes that are no archive fail here, not deep inside Keras
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
                "on every executor or ship them with SparkContext.addPyFile (through Spark "
                "Connect: SparkSession.addArtifacts(path, pyfile=True)). "
                f"Received: {str(exc).splitlines()[0][:300]}"
            ) from exc
    config = compile_config_of(data)
    if compile and config:
        model.compile_from_config(config)
    return model


def archive_config(data: bytes, source: str = "the model's .keras bytes") -> dict[str, Any]:
    """The ``config.json`` of a ``.keras`` archive; bytes that are not one (a corrupt or crafted
    file) get an error naming ``source`` instead of zipfile's or json's own."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError, RuntimeError) as exc:
        # RuntimeError: an encrypted member; NotImplementedError (a RuntimeError) a compression
        # method zipfile lacks. Either way no archive model.save() wrote.
        received = f"{type(exc).__name__} ({(str(exc).splitlines() or [''])[0][:200]})"
    else:
        if isinstance(config, dict):
            return config
        received = f"a config.json holding {type(config).__name__}, not an object"
    raise ValueError(
        f"Expected a Keras .keras archive (a zip holding config.json) in {source}. The file is "
        "damaged or was not written by model.save(): save the model again. "
        f"Received: {len(data)} bytes, {received}"
    )


def custom_names(data: bytes) -> list[str]:
    """Registered names ("package>Name") of the custom classes and functions in an archive."""
    config = archive_config(data)
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
    return archive_config(data).get("compile_config") or None


def model_id(data: bytes) -> str:
    """A stable id for cached copies of a model on executors."""
    return hashlib.sha256(data).hexdigest()[:32]
